"""Tests for the bundled prompt sets in pipelines/data/: they load strictly, fit their purpose, and do not overlap."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from fake_tokenizer import ByteChatTokenizer
from opdgraph.data import load_prompt_set

DATA_DIR = Path(__file__).resolve().parents[1] / "pipelines" / "data"
SPLITS = {"tiny": (64, 16), "demo": (300, 60)}


def read_rows(name):
    return [json.loads(line) for line in (DATA_DIR / f"{name}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["tiny_train", "tiny_eval", "demo_train", "demo_eval"])
def test_bundled_files_load_cleanly(name):
    """Every bundled file must load in strict mode with no bad rows and the intended size; otherwise the
    shipped pipelines would fail at their first step."""
    prompt_set = load_prompt_set([DATA_DIR / f"{name}.jsonl"], tokenizer=ByteChatTokenizer(), max_prompt_tokens=256)
    train_size, eval_size = SPLITS[name.split("_")[0]]
    assert len(prompt_set) == (train_size if name.endswith("train") else eval_size)
    assert prompt_set.summary.num_skipped == 0
    assert all(0 <= token < 256 for record in prompt_set.records for token in record.prompt_ids)
    assert len({record.messages[-1]["content"] for record in prompt_set.records}) == len(prompt_set)


@pytest.mark.parametrize("split", ["tiny", "demo"])
def test_train_and_eval_do_not_overlap(split):
    """No eval prompt may appear in train (compared case- and space-insensitively); overlap would make eval
    scores measure memorisation."""
    def normalise(text):
        return " ".join(text.lower().split())

    train = {normalise(row["prompt"]) for row in read_rows(f"{split}_train")}
    evaluation = {normalise(row["prompt"]) for row in read_rows(f"{split}_eval")}
    assert not train & evaluation


def test_tiny_prompts_are_short_ascii():
    """Tiny prompts must be ASCII and under 60 characters so the byte-level tiny pipeline stays fast."""
    for name in ("tiny_train", "tiny_eval"):
        for row in read_rows(name):
            assert row["prompt"].isascii() and len(row["prompt"]) < 60, row


def solve(prompt):
    """Independent check of a reference answer: parse the arithmetic back out of the prompt text."""
    numbers = [int(number) for number in re.findall(r"\d+", prompt)]
    if " plus " in prompt or "buys" in prompt:
        return numbers[0] + numbers[1]
    if " minus " in prompt or "gave" in prompt:
        return numbers[0] - numbers[1]
    if "divided by" in prompt or "equally among" in prompt:
        return numbers[0] // numbers[1] if numbers[0] % numbers[1] == 0 else None
    if "percent of" in prompt:
        return numbers[0] * numbers[1] / 100
    return numbers[0] * numbers[1]  # times, boxes, tickets, pages per day


def test_reference_answers_are_correct_numbers():
    """Every answer must be an int equal to the arithmetic in its prompt, and 20-30% of demo eval prompts must
    carry one; a wrong reference answer would silently corrupt eval accuracy."""
    for name in ("tiny_train", "tiny_eval", "demo_train", "demo_eval"):
        for row in read_rows(name):
            if "answer" in row:
                assert isinstance(row["answer"], int) and solve(row["prompt"]) == row["answer"], row
    demo_eval = read_rows("demo_eval")
    assert 0.2 <= sum("answer" in row for row in demo_eval) / len(demo_eval) <= 0.3


def test_committed_files_match_the_generator(tmp_path):
    """The committed JSONL files must be exactly what make_prompts.py writes, so the script stays the source of
    truth and stays deterministic."""
    spec = importlib.util.spec_from_file_location("make_prompts", DATA_DIR / "make_prompts.py")
    make_prompts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_prompts)
    make_prompts.write_prompt_sets(tmp_path)
    for name in ("tiny_train", "tiny_eval", "demo_train", "demo_eval", "hybrid_train", "hybrid_eval"):
        assert (tmp_path / f"{name}.jsonl").read_text() == (DATA_DIR / f"{name}.jsonl").read_text(), name


def test_hybrid_solutions_work_the_sum_and_answer_last():
    """Every hybrid row's gold solution must add the tens, then the ones, and end with the true sum (its answer),
    and no eval prompt may be a train prompt: a wrong gold would train the student on wrong arithmetic."""
    train, evaluation = read_rows("hybrid_train"), read_rows("hybrid_eval")
    assert (len(train), len(evaluation)) == (48, 8)
    assert not {row["prompt"] for row in train} & {row["prompt"] for row in evaluation}
    for row in train + evaluation:
        a, b = (int(number) for number in re.findall(r"\d+", row["prompt"]))
        assert row["answer"] == a + b == solve(row["prompt"])
        assert row["solution"].startswith(f"Add the tens: {a // 10 * 10} + {b // 10 * 10} = ")
        assert row["solution"].endswith(f"So the sum is {a + b}.")

"""Eval's accuracy with the gold prefix grades only what the student wrote: rows without a gold solution, and rows
whose prefix would be the whole solution, are left out (a fraction of 1.0 would otherwise grade the gold itself)."""

from __future__ import annotations

from opdgraph.data.records import PromptRecord
from opdgraph.data.sampler import SampledPrompt
from opdgraph.runtime.batches import Sample
from opdgraph.runtime.gold_prefix_eval import accuracy_with_gold_prefix
from opdgraph.stages.sft import Config


class DigitTokenizer:
    def decode(self, ids) -> str:
        return "".join(str(i) for i in ids)


def _prompt(index: int, gold: tuple[int, ...], answer: str | None) -> SampledPrompt:
    record = PromptRecord(source="eval.jsonl", row=index + 1, location=f"eval.jsonl:{index + 1}",
                          messages=({"role": "user", "content": "q"},), prompt_ids=(9, 9), answer=answer,
                          gold_ids=gold)
    return SampledPrompt(record=record, prompt_index=index, index_in_step=index, epoch=0)


def _student_echoes_nothing(placed: list) -> list:
    """The student answers nothing after its prefix: only a prefix holding the answer can be graded correct."""
    return [Sample(prompt_ids=list(p.record.prompt_ids), response_ids=[], prompt_index=i, sample_index=0,
                   answer=p.record.answer, gold_prefix_length=p.record.gold_prefix_length)
            for i, p in enumerate(placed)]


def test_whole_gold_prefixes_and_rows_without_gold_are_not_graded():
    sft = Config(gold_prefix_field="solution", gold_prefix_max_tokens=8, gold_prefix_fraction=1.0)
    prompts = [_prompt(0, (4, 2), "42"),          # fraction 1.0: the prefix is the whole gold -> not graded
               _prompt(1, (), "7"),               # no gold solution -> not graded
               _prompt(2, tuple(range(1, 11)), "12345678910"),  # 10 tokens, prefix 8 of them: graded, wrong
               _prompt(3, (5,) * 12, None)]       # no reference answer -> not graded
    result = accuracy_with_gold_prefix(sft, DigitTokenizer(), prompts, _student_echoes_nothing)
    assert result["gold_prefix_graded"] == 1
    assert result["accuracy_with_gold_prefix"] == 0.0  # the student added nothing: the prefix alone is not right
    assert result["gold_prefix_length_mean"] == 8 and result["gold_prefix_share_mean"] == 0.8


def test_nothing_to_grade_reports_nothing():
    sft = Config(gold_prefix_field="solution", gold_prefix_max_tokens=8, gold_prefix_fraction=1.0)
    assert accuracy_with_gold_prefix(sft, DigitTokenizer(), [_prompt(0, (4, 2), "42")], _student_echoes_nothing) == {}
    assert accuracy_with_gold_prefix(None, DigitTokenizer(), [_prompt(0, (4, 2, 1), "42")],
                                     _student_echoes_nothing) == {}

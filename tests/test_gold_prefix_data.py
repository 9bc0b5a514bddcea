"""The gold prefix at the data stage (opdgraph.data.gold_prefix): exact seams, and rows that cannot carry one.

Seam: the rollout prompt of a row (prompt + its first k gold ids) must be exactly the first tokens of the whole
chat -- messages plus an assistant turn holding the gold solution, rendered by the chat template in its
continue-final-message form and tokenised as one text -- for every k. Checked with the built-in byte tokenizer and
with an HF tokenizer whose BPE merges are trained here (no network), where cutting the gold text and tokenising the
piece on its own (what a prefix tokenised separately does) gives other ids at the seam: the comparison can fail.
Rows: a missing, empty or non-string gold field is a bad row naming the file and line and the setting.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opdgraph.data import PromptDataError, load_prompt_set
from opdgraph.data.gold_prefix import GoldField, with_gold_prefix
from opdgraph.data.sampler import SampledPrompt
from opdgraph.models.tokenizers import ByteTokenizer, HFTokenizer
from opdgraph.train.prefix_schedule import PrefixSchedule

ROWS = [{"prompt": "What is 25 plus 37?", "solution": "Add the tens: 20 + 30 = 50. Add the ones: 5 + 7 = 12. "
                                                      "So the sum is 62."},
        {"prompt": "Tell me about the tens and the ones.", "solution": "The tens are counted first, then the ones."}]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _bpe_tokenizer() -> HFTokenizer:
    """A byte-level BPE tokenizer with merges learnt from the rows' text, and a ChatML-style template."""
    import tokenizers
    import transformers

    model = tokenizers.Tokenizer(tokenizers.models.BPE())
    model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    model.train_from_iterator([text for row in ROWS for text in row.values()] * 20, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<|im_end|>")
    tokenizer.chat_template = CHATML
    return HFTokenizer(tokenizer)


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _load(path: Path, tokenizer, field: str = "solution"):
    return load_prompt_set([path], tokenizer=tokenizer, max_prompt_tokens=256,
                           gold=GoldField(field=field, tokenizer=tokenizer, where="set at p.toml:40"))


def _full_text_ids(tokenizer, record, gold: str) -> list[int]:
    """The whole chat rendered as text by the template, then tokenised once (independently of gold_ids)."""
    messages = [*record.messages, {"role": "assistant", "content": gold}]
    if isinstance(tokenizer, ByteTokenizer):  # its format: <|bos|> (<|role|> content <|end|>)*, the last turn open
        ids = [tokenizer.bos_token_id]
        for message in messages:
            ids += [tokenizer.special_ids[f"<|{message['role']}|>"], *tokenizer.encode(message["content"]),
                    tokenizer.special_ids["<|end|>"]]
        return ids[:-1]
    text = tokenizer.tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    return tokenizer.tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("make_tokenizer", [ByteTokenizer, _bpe_tokenizer], ids=["byte", "bpe"])
def test_prompt_plus_prefix_is_the_start_of_the_full_text(tmp_path, make_tokenizer):
    """Fails if a rollout prompt with a gold prefix of any length differs from the tokenised full text at the seam
    (the prefix tokenised on its own, or cut anywhere but at the full text's own token boundaries)."""
    tokenizer = make_tokenizer()
    prompts = _load(_write_rows(tmp_path / "rows.jsonl", ROWS), tokenizer)
    for index, record in enumerate(prompts.records):
        full = _full_text_ids(tokenizer, record, ROWS[index]["solution"])
        assert list(record.prompt_ids) + list(record.gold_ids) == full
        for k in range(len(record.gold_ids) + 1):
            rule = PrefixSchedule(max_tokens=k)
            placed = with_gold_prefix([SampledPrompt(record=record, prompt_index=index, index_in_step=index,
                                                     epoch=0)], rule, step=0)[0].record
            assert list(placed.prompt_ids) == full[:len(record.prompt_ids) + k]
            assert placed.gold_prefix_length == k
    if make_tokenizer is _bpe_tokenizer:  # the separate tokenisation the seam rule replaces does differ here
        record, gold = prompts.records[0], ROWS[0]["solution"]
        full = _full_text_ids(tokenizer, record, gold)
        separate = [list(record.prompt_ids) + tokenizer.encode(gold[:cut]) for cut in range(1, len(gold))]
        assert any(ids != full[:len(ids)] for ids in separate)


def test_teacher_prompts_get_the_same_prefix(tmp_path):
    """Fails if a teacher that sees a prompt of its own does not see the student's gold prefix after it (it would
    score the continuation without the context the student had)."""
    tokenizer = ByteTokenizer()
    record = _load(_write_rows(tmp_path / "rows.jsonl", ROWS[:1]), tokenizer).records[0]
    import attrs

    record = attrs.evolve(record, teacher_prompt_ids={"teacher_score": (1, 2, 3)})
    placed = with_gold_prefix([SampledPrompt(record=record, prompt_index=0, index_in_step=0, epoch=0)],
                              PrefixSchedule(max_tokens=5), step=0)[0].record
    assert placed.teacher_prompt_ids["teacher_score"] == (1, 2, 3, *record.gold_ids[:5])
    assert placed.prompt_ids[-5:] == record.gold_ids[:5]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "hi"}, "[sft] needs field 'solution' (its gold_prefix_field, set at p.toml:40), which this row "
                       "does not have"),
    ({"prompt": "hi", "solution": ""}, "must be a non-empty string (the gold solution), got an empty string"),
    ({"prompt": "hi", "solution": 7}, "must be a non-empty string (the gold solution), got number"),
])
def test_bad_gold_rows_name_file_and_line(tmp_path, row, message):
    """Fails if a row without a usable gold solution is not reported with its file:line and the setting to fix."""
    path = _write_rows(tmp_path / "rows.jsonl", [ROWS[0], row])
    with pytest.raises(PromptDataError) as error:
        _load(path, ByteTokenizer())
    assert f"{path}:2: " in str(error.value) and message in str(error.value)

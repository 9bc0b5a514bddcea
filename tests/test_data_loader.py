"""Tests for opdgraph.data.loader: field selection, bad-row reporting (golden messages), skip mode, lengths, Parquet."""

from __future__ import annotations

import json
import sys

import pytest

from fake_tokenizer import ByteChatTokenizer
from opdgraph.data import PromptDataError, load_prompt_set


TOKENIZER = ByteChatTokenizer()


def write_jsonl(path, rows):
    """Write rows (dicts, or raw strings used verbatim as lines) to a JSONL file and return the path."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def load(path, **options):
    return load_prompt_set([path], tokenizer=TOKENIZER, **options)


@pytest.mark.parametrize(
    "row, expected_content",
    [
        ({"prompt": "p", "question": "q", "problem": "r"}, "p"),
        ({"question": "q", "problem": "r"}, "q"),
        ({"problem": "r", "messages": [{"role": "user", "content": "m"}]}, "r"),
        ({"messages": [{"role": "user", "content": "m"}]}, "m"),
        ({"prompt": None, "question": "q"}, "q"),
    ],
)
def test_auto_field_picks_first_present(tmp_path, row, expected_content):
    """Auto selection must follow prompt > question > problem > messages, with null counting as absent;
    otherwise datasets with several text columns would train on the wrong one."""
    prompt_set = load(write_jsonl(tmp_path / "p.jsonl", [row]))
    assert prompt_set[0].messages == ({"role": "user", "content": expected_content},)


def test_explicit_field_uses_only_that_field(tmp_path):
    """An explicit prompt_field must read that field and must not fall back to "prompt" when it is missing."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "do it", "prompt": "other"}])
    assert load(path, prompt_field="instruction")[0].messages == ({"role": "user", "content": "do it"},)
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "other"}])
    with pytest.raises(PromptDataError) as error:
        load(path, prompt_field="instruction")
    assert f"{path}:1: missing field 'instruction' (found keys: 'prompt')" in str(error.value)


def test_messages_system_prompt_and_token_ids(tmp_path):
    """Messages must be kept as written, system_prompt prepended, and prompt_ids must be the tokenizer's
    chat_ids of exactly those messages; otherwise rollout would see a different prompt than the data."""
    conversation = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "add 2 and 2"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": conversation}, {"prompt": "solo"}])
    prompt_set = load(path, system_prompt="Be brief.")
    system = {"role": "system", "content": "Be brief."}
    assert prompt_set[0].messages == (system, *conversation)
    assert prompt_set[1].messages == (system, {"role": "user", "content": "solo"})
    for record in prompt_set.records:
        assert record.prompt_ids == tuple(TOKENIZER.chat_ids(list(record.messages)))
    assert [(record.source, record.row, record.location) for record in prompt_set.records] == [
        (str(path), 1, f"{path}:1"), (str(path), 2, f"{path}:2")]


def test_explicit_messages_field_and_system_prompt_conflicts(tmp_path):
    """An explicit field may hold a messages list; a row with its own system message while system_prompt is set,
    or a conversation ending on a system turn, must be a bad row rather than one message being ignored."""
    own_system = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]
    path = write_jsonl(tmp_path / "p.jsonl", [{"chat": own_system}, {"chat": [{"role": "system", "content": "s"}]}])
    with pytest.raises(PromptDataError) as error:
        load(path, prompt_field="chat")
    assert str(error.value).splitlines()[1:] == [
        f"  {path}:2: last message of 'chat' has role 'system'; a prompt must end with a user message "
        "(remove the trailing turn from the data, the student writes the reply)"]
    prompt_set = load(path, prompt_field="chat", on_bad_row="skip")
    assert prompt_set[0].messages == tuple(own_system)
    with pytest.raises(PromptDataError) as error:
        load(path, prompt_field="chat", system_prompt="Be kind.")
    assert (f"{path}:1: field 'chat' has its own system message but system_prompt is set; remove one of the two"
            in str(error.value))


def test_answer_field_kept_as_written(tmp_path):
    """Reference answers must be kept with their JSON type (number or string) and be None when absent or when
    answer_field is None, so eval scoring never sees an invented answer."""
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "a", "answer": 42}, {"prompt": "b", "answer": "x"}, {"prompt": "c"},
        {"prompt": "d", "solution": 2.5}])
    assert [record.answer for record in load(path).records] == [42, "x", None, None]
    assert [record.answer for record in load(path, answer_field="solution").records] == [None, None, None, 2.5]
    assert [record.answer for record in load(path, answer_field=None).records] == [None] * 4


BAD_ROWS = [
    ('{"prompt": "ok"}', None),
    ('{"prompt": "unterminated', "invalid JSON: Unterminated string starting at (column 12)"),
    ('["prompt", "x"]', "row is a JSON array, expected an object"),
    ({"text": "x", "id": 3},
     "no prompt field: expected one of 'prompt', 'question', 'problem', 'messages' (found keys: 'text', 'id'); "
     "set prompt_field to the name of the field that holds the prompt"),
    ({"prompt": 7}, "field 'prompt' must be a string or a list of messages, got number"),
    ({"prompt": "   "}, "field 'prompt' is empty"),
    ({"messages": []}, "field 'messages' is an empty list of messages"),
    ({"messages": ["hi"]}, "messages[0] must be an object with \"role\" and \"content\", got string"),
    ({"messages": [{"role": "user", "content": ["a"]}]}, "messages[0].content must be a string, got array"),
    ({"messages": [{"role": "bot", "content": "a"}]},
     "messages[0].role is 'bot'; expected one of 'system', 'user', 'assistant'"),
    ({"messages": [{"role": "user", "content": "a", "name": "x"}]},
     "messages[0] has unsupported keys 'name' (only \"role\" and \"content\" are used)"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "last message of 'messages' has role 'assistant'; a prompt must end with a user message "
     "(remove the trailing turn from the data, the student writes the reply)"),
    ({"prompt": "q", "answer": [1]}, "field 'answer' must be a string or a number, got array"),
    ("", None),  # a blank line is not a row
    ({"question": "fine"}, None),
]


def test_every_bad_row_reported_at_once_with_location(tmp_path):
    """All bad rows must be reported in one error with file:line and the exact reason (golden strings), so a
    user fixes the file in one pass; blank lines are not rows."""
    path = write_jsonl(tmp_path / "bad.jsonl", [row for row, _ in BAD_ROWS])
    expected_lines = [f"  {path}:{line}: {reason}" for line, (_, reason) in enumerate(BAD_ROWS, 1) if reason]
    with pytest.raises(PromptDataError) as error:
        load(path)
    assert str(error.value) == "\n".join([
        f"{len(expected_lines)} bad prompt rows in {path} (fix them, or set on_bad_row = \"skip\" to leave them "
        "out):", *expected_lines])


def test_skip_mode_counts_by_kind(tmp_path):
    """With on_bad_row = "skip" the good rows must load in order and every skipped row must be counted under
    its kind, with the first few reasons listed; a silent drop would hide broken data."""
    path = write_jsonl(tmp_path / "bad.jsonl", [row for row, _ in BAD_ROWS])
    prompt_set = load(path, on_bad_row="skip")
    assert [record.messages[-1]["content"] for record in prompt_set.records] == ["ok", "fine"]
    summary = prompt_set.summary
    assert summary.num_loaded == 2
    assert summary.num_skipped_by_kind == {
        "assistant_last": 1, "bad_message": 4, "empty_prompt": 2, "invalid_json": 1, "missing_field": 1,
        "not_an_object": 1, "wrong_type": 2}
    assert summary.num_skipped == 12
    description = summary.describe().splitlines()
    assert description[0] == ("loaded 2 prompts, skipped 12 bad rows (assistant_last: 1, bad_message: 4, "
                              "empty_prompt: 2, invalid_json: 1, missing_field: 1, not_an_object: 1, wrong_type: 2)")
    assert description[1] == f"  {path}:2: invalid JSON: Unterminated string starting at (column 12)"
    assert description[-1] == "  ... and 7 more"
    assert load(write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "a"}])).summary.describe() == "loaded 1 prompts"


def test_error_lists_a_capped_number_of_rows(tmp_path):
    """A file with many bad rows must list the first 20 and count the rest, keeping the error readable."""
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": ""}] * 25)
    with pytest.raises(PromptDataError) as error:
        load(path)
    lines = str(error.value).splitlines()
    assert len(lines) == 22
    assert lines[20] == f"  {path}:20: field 'prompt' is empty"
    assert lines[21] == "  ... and 5 more bad rows"


def test_too_long_prompts_reported_never_truncated(tmp_path):
    """Prompts over max_prompt_tokens must be bad rows with their length (error or skipped), never truncated;
    a prompt of exactly the limit must load."""
    exact = "x" * 20
    limit = len(TOKENIZER.chat_ids([{"role": "user", "content": exact}]))
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": exact}, {"prompt": exact + "yy"}])
    with pytest.raises(PromptDataError) as error:
        load(path, max_prompt_tokens=limit)
    assert (f"{path}:2: prompt is {limit + 2} tokens, over max_prompt_tokens = {limit} (prompts are never "
            "truncated: shorten it or raise the limit)") in str(error.value)
    prompt_set = load(path, max_prompt_tokens=limit, on_bad_row="skip")
    assert len(prompt_set) == 1 and len(prompt_set[0].prompt_ids) == limit
    assert prompt_set.summary.num_skipped_by_kind == {"too_long": 1}


def test_bad_rows_of_several_files_reported_together(tmp_path):
    """Bad rows of every file must appear in one error, each with its own file name; records keep file order."""
    first = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a1"}, {"prompt": ""}])
    second = write_jsonl(tmp_path / "b.jsonl", [{"prompt": 1}, {"prompt": "b2"}])
    with pytest.raises(PromptDataError) as error:
        load_prompt_set([first, second], tokenizer=TOKENIZER)
    assert f"{first}:2: field 'prompt' is empty" in str(error.value)
    assert f"{second}:1: field 'prompt' must be a string" in str(error.value)
    prompt_set = load_prompt_set([first, second], tokenizer=TOKENIZER, on_bad_row="skip")
    assert [record.location for record in prompt_set.records] == [f"{first}:1", f"{second}:2"]


def test_nothing_usable_is_an_error(tmp_path):
    """A file whose rows are all skipped must not give an empty prompt set (training would stall later)."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": ""}])
    with pytest.raises(PromptDataError, match=r"no usable prompts in .*p.jsonl; loaded 0 prompts, skipped 1"):
        load(path, on_bad_row="skip")


def test_file_and_option_errors(tmp_path):
    """A missing file, an unknown extension, and bad options must each fail with a message naming the problem."""
    with pytest.raises(PromptDataError, match="missing.jsonl: prompt file not found"):
        load(tmp_path / "missing.jsonl")
    (tmp_path / "p.csv").write_text("prompt\nx\n")
    with pytest.raises(PromptDataError, match=r"p.csv: unsupported prompt file type '.csv'; use one of .jsonl, "
                                              r".parquet"):
        load(tmp_path / "p.csv")
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    with pytest.raises(PromptDataError, match="on_bad_row must be one of"):
        load(path, on_bad_row="drop")
    with pytest.raises(PromptDataError, match="max_prompt_tokens must be a positive integer"):
        load(path, max_prompt_tokens=0)
    with pytest.raises(PromptDataError, match="no prompt files given"):
        load_prompt_set([], tokenizer=TOKENIZER)


def test_parquet_round_trip(tmp_path):
    """Parquet files must load like JSONL (string and messages columns, nulls as absent, answers) and bad rows
    must be located by 0-based row index."""
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    rows = [
        {"prompt": "What is 2 + 2?", "messages": None, "answer": 4},
        {"prompt": None, "messages": [{"role": "user", "content": "hi"}], "answer": None},
        {"prompt": "", "messages": None, "answer": None},
    ]
    path = tmp_path / "p.parquet"
    parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    with pytest.raises(PromptDataError) as error:
        load(path)
    assert str(error.value).splitlines()[1] == f"  {path}:row 2: field 'prompt' is empty"
    prompt_set = load(path, on_bad_row="skip")
    assert [record.messages for record in prompt_set.records] == [
        ({"role": "user", "content": "What is 2 + 2?"},), ({"role": "user", "content": "hi"},)]
    assert [(record.row, record.answer) for record in prompt_set.records] == [(0, 4), (1, None)]


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    """Without pyarrow, reading Parquet must fail with `pip install pyarrow` in the message, not an ImportError."""
    path = tmp_path / "p.parquet"
    path.write_bytes(b"not really parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(PromptDataError, match="pip install pyarrow"):
        load(path)

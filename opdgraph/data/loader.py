"""Load prompt files into a ``PromptSet``: read rows, pick the prompt field, apply the chat template, check lengths.

This is the data stage's entry point. The caller (the runtime, from the pipeline's ``[data]`` table) passes files
already resolved to paths and a tokenizer; the result feeds the ``PromptSampler`` (training) or eval directly.

Every unusable row (unparseable, missing or mistyped field, empty prompt, assistant-last messages, prompt longer
than ``max_prompt_tokens``) is a ``BadRow`` naming its file and row. With ``on_bad_row = "error"`` (the default)
all bad rows of all files are raised together in one ``PromptDataError``; with ``"skip"`` they are left out and
counted in the summary. Teachers that see another prompt and routed rows (opdgraph.data.teacher_prompts) add
their own bad rows (a missing context or route field, an unknown route, a teacher prompt over its limit), and so
does a gold solution (opdgraph.data.gold_prefix: missing, not a string, not continuing the prompt).
Nothing is truncated: a prompt that is too long is a bad row, not a shortened prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Protocol, Sequence, Union

from opdgraph.data.fields import RowProblem, row_answer, row_to_messages
from opdgraph.data.gold_prefix import GoldField, gold_ids
from opdgraph.data.readers import RawRow, read_rows
from opdgraph.data.teacher_prompts import Routing, TeacherPrompt, route_of, teacher_prompt_ids
from opdgraph.data.records import BadRow, LoadSummary, PromptDataError, PromptRecord, PromptSet, format_bad_rows

ON_BAD_ROW_CHOICES = ("error", "skip")


class PromptTokenizer(Protocol):
    """The part of the tokenizer the data stage uses (implemented in ``opdgraph.models``)."""

    vocab_size: int

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True,
                 continue_final_message: bool = False) -> list[int]: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def _check_options(files, prompt_field, on_bad_row, max_prompt_tokens) -> list[Path]:
    if isinstance(files, (str, Path)):
        files = [files]
    files = [Path(file) for file in files]
    if not files:
        raise PromptDataError("no prompt files given")
    if on_bad_row not in ON_BAD_ROW_CHOICES:
        raise PromptDataError(f"on_bad_row must be one of {ON_BAD_ROW_CHOICES}, got {on_bad_row!r}")
    if not isinstance(prompt_field, str) or not prompt_field:
        raise PromptDataError(f"prompt_field must be \"auto\" or a field name, got {prompt_field!r}")
    if max_prompt_tokens is not None and (
        isinstance(max_prompt_tokens, bool) or not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 1
    ):
        raise PromptDataError(f"max_prompt_tokens must be a positive integer or None, got {max_prompt_tokens!r}")
    return files


def _build_record(raw: RawRow, source: str, *, tokenizer, prompt_field, answer_field, system_prompt,
                  max_prompt_tokens, teacher_prompts=(), routing=None, gold=None) -> PromptRecord:
    messages = row_to_messages(raw.value, prompt_field, system_prompt)
    answer = row_answer(raw.value, answer_field)
    prompt_ids = tuple(tokenizer.chat_ids(messages, add_generation_prompt=True))
    if max_prompt_tokens is not None and len(prompt_ids) > max_prompt_tokens:
        raise RowProblem("too_long", f"prompt is {len(prompt_ids)} tokens, over max_prompt_tokens = "
                                     f"{max_prompt_tokens} (prompts are never truncated: shorten it or raise "
                                     "the limit)")
    teacher_ids = {rule.stage: teacher_prompt_ids(messages, raw.value, rule) for rule in teacher_prompts}
    return PromptRecord(source=source, row=raw.row, location=raw.location, messages=tuple(messages),
                        prompt_ids=prompt_ids, answer=answer, teacher_prompt_ids=teacher_ids,
                        route=route_of(raw.value, routing),
                        gold_ids=gold_ids(messages, raw.value, gold, prompt_ids) if gold is not None else ())


def load_prompt_set(
    files: Union[str, Path, Sequence[Union[str, Path]]],
    *,
    tokenizer: PromptTokenizer,
    prompt_field: str = "auto",
    answer_field: Optional[str] = "answer",
    system_prompt: str = "",
    max_prompt_tokens: Optional[int] = None,
    on_bad_row: str = "error",
    teacher_prompts: Sequence[TeacherPrompt] = (),
    routing: Optional[Routing] = None,
    gold: Optional[GoldField] = None,
) -> PromptSet:
    """Read, check and tokenise every row of ``files`` (in order); see the module docstring for the rules."""
    paths = _check_options(files, prompt_field, on_bad_row, max_prompt_tokens)
    records: list[PromptRecord] = []
    bad_rows: list[BadRow] = []
    for path in paths:
        for raw in read_rows(path):
            if isinstance(raw, BadRow):
                bad_rows.append(raw)
                continue
            try:
                records.append(_build_record(raw, str(path), tokenizer=tokenizer, prompt_field=prompt_field,
                                             answer_field=answer_field, system_prompt=system_prompt,
                                             max_prompt_tokens=max_prompt_tokens,
                                             teacher_prompts=teacher_prompts, routing=routing, gold=gold))
            except RowProblem as problem:
                bad_rows.append(BadRow(location=raw.location, kind=problem.kind, reason=problem.reason))

    file_names = ", ".join(str(path) for path in paths)
    if bad_rows and on_bad_row == "error":
        raise PromptDataError(format_bad_rows(
            bad_rows, f"{len(bad_rows)} bad prompt rows in {file_names} "
                      "(fix them, or set on_bad_row = \"skip\" to leave them out):"))
    summary = LoadSummary.from_rows(len(records), bad_rows)
    if not records:
        detail = f"; {summary.describe()}" if bad_rows else ""
        raise PromptDataError(f"no usable prompts in {file_names}{detail}")
    return PromptSet(records=tuple(records), summary=summary)

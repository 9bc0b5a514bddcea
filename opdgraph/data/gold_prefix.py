"""The gold solution of a prompt row, as token ids in the context of its prompt, and the gold prefix a rollout
starts from (hybrid SFT + OPD: the sft stage, stages/sft.py).

At load time each row's gold solution (its `gold_prefix_field`, a non-empty string) is put into an assistant turn
after the row's messages and the whole chat is tokenised as one sequence with the chat template's
continue-final-message form (the assistant turn left open). The student's prompt ids must be the start of that
sequence (the template renders the open turn after the same generation prompt); the rest are the gold ids of the
row (`PromptRecord.gold_ids`). The prefix of k tokens is then the first k of those ids, so prompt + prefix is
exactly the start of the tokenised full text: no seam where a prefix tokenised on its own would merge differently
with what precedes it.

Per step (`with_gold_prefix`), each prompt's rollout prompt becomes prompt + its first k gold ids (k from the
schedule, opdgraph.train.prefix_schedule), and every teacher prompt of the row gets the same k ids after it (the
teacher scores the student's ids, as it does for responses). `gold_prefix_length` records k: those last k prompt
ids are trained by cross-entropy, never by the divergence. Problems are RowProblems (the loader adds file:line).
Torch-free.
"""

from __future__ import annotations

from typing import Any

import attrs

from opdgraph.data.fields import RowProblem
from opdgraph.data.readers import json_type_name


@attrs.frozen(kw_only=True)
class GoldField:
    """Where a row's gold solution is, and the tokenizer that places it (the student's)."""

    field: str
    tokenizer: Any  # chat_ids(messages, continue_final_message=True)
    stage: str = "sft"  # names the rule in messages
    where: str = ""  # where gold_prefix_field is set (file:line)
    required: bool = True  # training rows must hold one; eval rows may not (their accuracy with the prefix skips them)


def gold_ids(messages, row: dict, rule: GoldField, prompt_ids: tuple[int, ...]) -> tuple[int, ...]:
    """The row's gold solution as ids that follow `prompt_ids` (see the module docstring)."""
    value = row.get(rule.field)
    if value is None and not rule.required:
        return ()
    if value is None:
        raise RowProblem("missing_field", f"[{rule.stage}] needs field {rule.field!r} (its gold_prefix_field, "
                                          f"{rule.where}), which this row does not have")
    if not isinstance(value, str) or not value.strip():
        got = "an empty string" if isinstance(value, str) else json_type_name(value)
        raise RowProblem("wrong_type", f"field {rule.field!r} ([{rule.stage}] gold_prefix_field) must be a "
                                       f"non-empty string (the gold solution), got {got}")
    try:
        full = tuple(rule.tokenizer.chat_ids([*messages, {"role": "assistant", "content": value}],
                                             add_generation_prompt=False, continue_final_message=True))
    except ValueError as problem:  # transformers: the template does not render the final message as given
        raise RowProblem("bad_gold", f"the chat template cannot continue an assistant turn holding field "
                                     f"{rule.field!r}: {problem}") from None
    if full[:len(prompt_ids)] != tuple(prompt_ids):
        raise RowProblem("bad_gold", f"the chat template renders the assistant turn holding field {rule.field!r} "
                                     f"differently from the generation prompt the student answers after (the prompt "
                                     f"is not the start of prompt + gold), so the gold cannot continue it exactly")
    if len(full) == len(prompt_ids):
        raise RowProblem("bad_gold", f"field {rule.field!r} adds no tokens after the prompt")
    return full[len(prompt_ids):]


def with_gold_prefix(prompts: list, schedule, step: int) -> list:
    """This step's SampledPrompts with each one's gold prefix placed (module docstring); `schedule` is a
    PrefixSchedule."""
    placed = []
    for prompt in prompts:
        record = prompt.record
        prefix = record.gold_ids[:schedule.tokens(len(record.gold_ids), step)]
        record = attrs.evolve(record, prompt_ids=record.prompt_ids + prefix, gold_prefix_length=len(prefix),
                              teacher_prompt_ids={stage: ids + prefix
                                                  for stage, ids in record.teacher_prompt_ids.items()})
        placed.append(attrs.evolve(prompt, record=record))
    return placed

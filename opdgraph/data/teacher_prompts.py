"""What a teacher sees of a prompt row when it is not the student's prompt, and which teacher a row is routed to.

A teacher stage with `system_prompt` and/or `context_field` (opdgraph.teachers) scores the student's response
under its own prompt: the student's messages, with the teacher's system message in place of the student's (or
first, when the student has none), and with the last user message rewritten by `context_template`
("{prompt}" = that message, "{context}" = the row's `context_field`, a non-empty string or a number). The
teacher's prompt is tokenised with the teacher's chat template as one sequence; it must fit the teacher stage's
prompt limit (never truncated). A routed row (loss.route_field) names its teacher by that field's value, which must
be one of the teachers' route values. Problems are RowProblems, so the loader reports them with the row's file and
line like every other bad row.
"""

from __future__ import annotations

from typing import Any

import attrs

from opdgraph.data.fields import RowProblem
from opdgraph.data.readers import json_type_name


@attrs.frozen(kw_only=True)
class TeacherPrompt:
    """One teacher stage's prompt rule (`stage` names it in messages)."""

    stage: str
    tokenizer: Any  # chat_ids(messages, add_generation_prompt=True)
    system_prompt: str = ""
    context_field: str = ""
    context_template: str = "{prompt}\n\n{context}"
    max_tokens: int = 0  # 0: no limit of its own
    where: str = ""  # where context_field is set (file:line), for messages
    limit_where: str = ""  # where the teacher's prompt limit comes from (file:line), for messages


@attrs.frozen(kw_only=True)
class Routing:
    field: str
    values: tuple[str, ...]  # every teacher's route values
    where: str = ""  # where route_field is set (file:line), for messages


def teacher_messages(messages: list[dict[str, str]], row: dict, rule: TeacherPrompt) -> list[dict[str, str]]:
    """The teacher's chat messages for a row whose student messages are `messages`."""
    messages = [dict(message) for message in messages]
    if rule.system_prompt:
        if messages and messages[0]["role"] == "system":
            messages[0]["content"] = rule.system_prompt
        else:
            messages.insert(0, {"role": "system", "content": rule.system_prompt})
    if rule.context_field:
        value = row.get(rule.context_field)
        if value is None:
            raise RowProblem("missing_field", f"[{rule.stage}] needs field {rule.context_field!r} "
                                              f"(its context_field, {rule.where}), which this row does not have")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)) or (isinstance(value, str)
                                                                                  and not value.strip()):
            raise RowProblem("wrong_type", f"field {rule.context_field!r} ([{rule.stage}] context_field) must be "
                                           f"a non-empty string or a number, got {json_type_name(value)}")
        last = max(index for index, message in enumerate(messages) if message["role"] == "user")
        messages[last]["content"] = rule.context_template.format(prompt=messages[last]["content"],
                                                                 context=value)
    return messages


def teacher_prompt_ids(messages, row: dict, rule: TeacherPrompt) -> tuple[int, ...]:
    ids = tuple(rule.tokenizer.chat_ids(teacher_messages(messages, row, rule), add_generation_prompt=True))
    if rule.max_tokens and len(ids) > rule.max_tokens:
        raise RowProblem("too_long", f"the prompt [{rule.stage}] sees is {len(ids)} tokens, over its limit of "
                                     f"{rule.max_tokens} (raise {rule.stage}.max_prompt_tokens, {rule.limit_where}; "
                                     f"prompts are never truncated)")
    return ids


def route_of(row: dict, routing: Routing | None) -> str | None:
    if routing is None:
        return None
    value = row.get(routing.field)
    if value is None:
        raise RowProblem("missing_field", f"field {routing.field!r} (loss.route_field, {routing.where}) is missing; "
                                          f"it picks the teacher of the row (values: {', '.join(routing.values)})")
    if not isinstance(value, str) or value not in routing.values:
        raise RowProblem("unknown_route", f"field {routing.field!r} = {value!r} names no teacher; the teachers' "
                                          f"route values are {', '.join(routing.values)} ({routing.where})")
    return value

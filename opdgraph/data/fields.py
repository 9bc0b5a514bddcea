"""Turn one raw row into chat messages and an optional reference answer, or say exactly why it cannot be used.

Field selection (``prompt_field``):
- ``"auto"``: the first of ``prompt`` / ``question`` / ``problem`` / ``messages`` present in the row. A key whose
  value is null counts as absent, because Parquet tables carry every column on every row.
- any other name: just that field, which may hold a string or an OpenAI-style messages list.

A string prompt becomes one user message. A messages list ([{"role", "content"}]) is used as written and must end
with a user message: a trailing assistant turn is a bad row, never silently dropped. A non-empty ``system_prompt``
is prepended as a system message (a row that already has its own system message is then a bad row, since one of
the two would have to be ignored).

Problems are raised as ``RowProblem(kind, reason)``; the loader adds the file location.
"""

from __future__ import annotations

from typing import Any, Optional

from opdgraph.data.readers import json_type_name
from opdgraph.data.records import Answer

AUTO_PROMPT_FIELDS = ("prompt", "question", "problem", "messages")
MESSAGE_ROLES = ("system", "user", "assistant")


class RowProblem(Exception):
    """Why one row cannot become a prompt; ``kind`` is the counting category, ``reason`` the readable sentence."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def _quoted_keys(keys) -> str:
    return ", ".join(repr(key) for key in keys) or "none"


def _select_prompt_field(row: dict, prompt_field: str) -> str:
    if prompt_field == "auto":
        for name in AUTO_PROMPT_FIELDS:
            if row.get(name) is not None:
                return name
        raise RowProblem(
            "missing_field",
            f"no prompt field: expected one of {_quoted_keys(AUTO_PROMPT_FIELDS)} "
            f"(found keys: {_quoted_keys(key for key, value in row.items() if value is not None)}); "
            "set prompt_field to the name of the field that holds the prompt",
        )
    if row.get(prompt_field) is None:
        raise RowProblem(
            "missing_field",
            f"missing field {prompt_field!r} (found keys: "
            f"{_quoted_keys(key for key, value in row.items() if value is not None)})",
        )
    return prompt_field


def _check_messages(field: str, value: Any) -> list[dict[str, str]]:
    if not isinstance(value, (list, tuple)):
        raise RowProblem("wrong_type", f"field {field!r} must be a string or a list of messages, "
                                       f"got {json_type_name(value)}")
    if not value:
        raise RowProblem("empty_prompt", f"field {field!r} is an empty list of messages")
    messages = []
    for index, message in enumerate(value):
        where = f"{field}[{index}]"
        if not isinstance(message, dict):
            raise RowProblem("bad_message", f"{where} must be an object with \"role\" and \"content\", "
                                            f"got {json_type_name(message)}")
        extra = [key for key, item in message.items() if key not in ("role", "content") and item is not None]
        if extra:
            raise RowProblem("bad_message", f"{where} has unsupported keys {_quoted_keys(extra)} "
                                            "(only \"role\" and \"content\" are used)")
        role, content = message.get("role"), message.get("content")
        if role not in MESSAGE_ROLES:
            raise RowProblem("bad_message", f"{where}.role is {role!r}; expected one of "
                                            f"{_quoted_keys(MESSAGE_ROLES)}")
        if not isinstance(content, str):
            raise RowProblem("bad_message", f"{where}.content must be a string, got {json_type_name(content)}")
        if not content.strip():
            raise RowProblem("empty_prompt", f"{where}.content is empty")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise RowProblem(
            "assistant_last" if messages[-1]["role"] == "assistant" else "bad_message",
            f"last message of {field!r} has role {messages[-1]['role']!r}; a prompt must end with a user message "
            "(remove the trailing turn from the data, the student writes the reply)",
        )
    return messages


def row_to_messages(row: dict, prompt_field: str, system_prompt: str) -> list[dict[str, str]]:
    """The chat messages of one row, with the system prompt (if any) first."""
    field = _select_prompt_field(row, prompt_field)
    value = row[field]
    if isinstance(value, str):
        if not value.strip():
            raise RowProblem("empty_prompt", f"field {field!r} is empty")
        messages = [{"role": "user", "content": value}]
    else:
        messages = _check_messages(field, value)
    if system_prompt:
        if messages[0]["role"] == "system":
            raise RowProblem("bad_message", f"field {field!r} has its own system message but system_prompt is "
                                            "set; remove one of the two")
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def row_answer(row: dict, answer_field: Optional[str]) -> Answer:
    """The reference answer as written (string or number), or None when the row has none."""
    if answer_field is None:
        return None
    value = row.get(answer_field)
    if value is None or (isinstance(value, (str, int, float)) and not isinstance(value, bool)):
        return value
    raise RowProblem("wrong_type", f"field {answer_field!r} must be a string or a number, "
                                   f"got {json_type_name(value)}")

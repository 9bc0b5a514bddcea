"""Helpers for declaring config fields: every field carries a help string and, optionally, a value check.

Config classes (the pipeline sections here and each stage's Config in `stages/<kind>.py`) are attrs frozen kw_only
classes whose fields are made with `setting(...)`. Checks run after typing, so they see well-typed values; each
returns None when the value is fine, or a message saying what is wrong and what to do.
"""

from __future__ import annotations

from typing import Callable

import attrs

REQUIRED = attrs.NOTHING


def setting(default=REQUIRED, *, help: str, check: Callable[[object], str | None] | None = None):
    """An attrs field with a help string; list/dict defaults are copied per instance."""
    metadata = {"help": help, "check": check}
    if isinstance(default, (list, dict)):
        return attrs.field(factory=lambda: type(default)(default), metadata=metadata)
    return attrs.field(default=default, metadata=metadata)


def help_of(config_class: type, name: str) -> str:
    return attrs.fields_dict(config_class)[name].metadata.get("help", "")


def positive(value) -> str | None:
    return None if value > 0 else f"must be > 0, got {value!r}"


def non_negative(value) -> str | None:
    return None if value >= 0 else f"must be >= 0, got {value!r}"


def unit_interval(value) -> str | None:
    return None if 0 <= value <= 1 else f"must be in [0, 1], got {value!r}"


def field_problems(config) -> list[tuple[str, str]]:
    """(field name, message) for every field whose check fails, then the class's own cross-field checks."""
    problems = []
    for field in attrs.fields(type(config)):
        check = field.metadata.get("check")
        value = getattr(config, field.name)
        if check is not None and value is not None:
            message = check(value)
            if message:
                problems.append((field.name, message))
        if attrs.has(type(value)):
            problems += [(f"{field.name}.{name}", message) for name, message in field_problems(value)]
    cross_checks = getattr(config, "cross_problems", None)
    if cross_checks is not None:
        problems += list(cross_checks())
    return problems

"""Helpers for declaring config fields: every field carries a help string and, optionally, a value check.

Config classes (the pipeline sections here and each stage's Config in `stages/<kind>.py`) are attrs frozen kw_only
classes whose fields are made with `setting(...)`. Checks run after typing, so they see well-typed values; each
returns None when the value is fine, or a message saying what is wrong and what to do.

Every float of every config (a float field, or a float inside a list/tuple field) must be finite: TOML's inf and
nan are rejected here, once for all fields, before the field's own check runs, unless the field is declared with
`allow_non_finite=True`. (A check like `positive` alone lets `lr = inf` through, and one infinite step ruins
every weight.)
"""

from __future__ import annotations

import math
from typing import Callable

import attrs

REQUIRED = attrs.NOTHING
SEED_LIMIT = 2**63  # torch.manual_seed and numpy take seeds below this (and the sampler's int64 keys)


def setting(default=REQUIRED, *, help: str, check: Callable[[object], str | None] | None = None,
            allow_non_finite: bool = False):
    """An attrs field with a help string; list/dict defaults are copied per instance."""
    metadata = {"help": help, "check": check, "allow_non_finite": allow_non_finite}
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


def valid_seed(value) -> str | None:
    return None if 0 <= value < SEED_LIMIT else f"must be an integer in [0, 2**63), got {value!r}"


def not_empty(value) -> str | None:
    return None if len(value) else "must not be empty"


def _non_finite(value) -> bool:
    if type(value) is float:
        return not math.isfinite(value)
    return isinstance(value, (list, tuple)) and any(_non_finite(item) for item in value)


def field_problems(config) -> list[tuple[str, str]]:
    """(field name, message) for every field whose check fails, then the class's own cross-field checks."""
    problems = []
    for field in attrs.fields(type(config)):
        check = field.metadata.get("check")
        value = getattr(config, field.name)
        if _non_finite(value) and not field.metadata.get("allow_non_finite"):
            shown = list(value) if isinstance(value, tuple) else value
            problems.append((field.name, f"must be a finite number, got {shown!r} (inf and nan are not accepted)"))
        elif check is not None and value is not None:
            message = check(value)
            if message:
                problems.append((field.name, message))
        if attrs.has(type(value)):
            problems += [(f"{field.name}.{name}", message) for name, message in field_problems(value)]
    cross_checks = getattr(config, "cross_problems", None)
    if cross_checks is not None:
        problems += list(cross_checks())
    return problems

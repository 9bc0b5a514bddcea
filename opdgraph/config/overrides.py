"""`--set a.b=value` overrides: parse the value as a TOML literal (else a bare string) and apply it to the raw tables.

Overrides are applied to the raw TOML dict before typing, so an overridden path is validated by exactly the same
rules (and the same did-you-mean suggestions) as the file; the error location reads `--set a.b=value`.
"""

from __future__ import annotations

import re
import tomllib

import attrs

KEY_PART = re.compile(r"^[A-Za-z0-9_-]+$")


@attrs.frozen
class Override:
    text: str
    parts: tuple[str, ...]
    value: object

    @property
    def path(self) -> str:
        return ".".join(self.parts)

    @property
    def location(self) -> str:
        return f"--set {self.text}"


def parse_override(text: str) -> Override:
    """Parse `a.b=value`; raises ValueError with a message saying what is wrong."""
    key, equals, literal = text.partition("=")
    parts = tuple(part.strip() for part in key.strip().split("."))
    if not equals or not all(KEY_PART.match(part) for part in parts):
        raise ValueError(f"--set expects dotted.key=value, got {text!r}")
    try:
        value = tomllib.loads(f"value = {literal.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = literal.strip()  # a bare word: rollout.backend=torch
    return Override(text, parts, value)


def apply_override(raw: dict, override: Override) -> str | None:
    """Set the value in place, creating tables on the way; returns a message if a scalar is in the way."""
    table = raw
    for depth, part in enumerate(override.parts[:-1]):
        existing = table.setdefault(part, {})
        if not isinstance(existing, dict):
            prefix = ".".join(override.parts[: depth + 1])
            return f"{prefix} is a value, not a table; cannot set {override.path}"
        table = existing
    table[override.parts[-1]] = override.value
    return None

"""Find the line of every table header and key in a TOML file's text (tomllib reports no positions).

`key_lines(text)` maps dotted paths ('rollout', 'rollout.max_new_tokens', 'pipeline.hardware.pcie_gbps') to their
1-based line. It skips the insides of multi-line strings and arrays; keys inside an inline table share the line of
the key that holds the table. Good enough for error messages and provenance comments, which is all it is for.
"""

from __future__ import annotations

import re

HEADER = re.compile(r"^\[\[?\s*([^\[\]]+?)\s*\]\]?\s*(#.*)?$")
KEY = re.compile(r"""^((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*=(.*)$""")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'[^\']*\'')


def _split_dotted(key: str) -> list[str]:
    parts = re.findall(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""", key)
    return [part.strip("\"'") for part in parts]


def _bracket_depth_change(value: str) -> int:
    code = STRING.sub('""', value).split("#")[0]
    return code.count("[") - code.count("]")


def key_lines(text: str) -> dict[str, int]:
    lines: dict[str, int] = {}
    table: list[str] = []
    open_brackets = 0
    multiline_quote = None
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if multiline_quote is not None:
            if multiline_quote in stripped:
                multiline_quote = None
            continue
        if open_brackets > 0:
            open_brackets += _bracket_depth_change(stripped)
            continue
        if not stripped or stripped.startswith("#"):
            continue
        header = HEADER.match(stripped)
        if header:
            table = _split_dotted(header.group(1))
            lines.setdefault(".".join(table), number)
            continue
        key = KEY.match(stripped)
        if not key:
            continue
        path = ".".join(table + _split_dotted(key.group(1)))
        lines.setdefault(path, number)
        value = key.group(2).strip()
        for quote in ('"""', "'''"):
            if value.startswith(quote) and value.count(quote) == 1:
                multiline_quote = quote
        if value.startswith("["):
            open_brackets = _bracket_depth_change(value)
    return lines

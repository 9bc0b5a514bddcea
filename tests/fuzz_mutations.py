"""Generated bad inputs for the fuzz test: small, realistic edits of the shipped pipelines and their data files.

Each mutation copies `pipelines/` into a scratch folder and changes ONE file in one way a person (or a damaged disk)
might: a typo in a key (top level, in a table, inside an inline model config), a value of the wrong type or out of
range (negative, zero, inf, nan, huge), a deleted line or table, a duplicated key, flipped or non-UTF-8 bytes, and in
the JSONL data files: torn lines, invalid JSON, fields of the wrong type, missing fields, empty files. Mutations are
text edits, so the error a user sees can point at the line that was changed. Everything is drawn from a seeded
random.Random: the same seed gives the same mutations (a failure names its seed and mutation).
"""

from __future__ import annotations

import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

PIPELINES = Path(__file__).parent.parent / "pipelines"
KEY_LINE = re.compile(r"^(\s*)([A-Za-z_][A-Za-z0-9_]*)(\s*=\s*)(.*)$")
INLINE_KEY = re.compile(r"([{,]\s*)([A-Za-z_][A-Za-z0-9_]*)(\s*=\s*)([^,}]+)")
BAD_VALUES = ('"64"', "true", "false", "1.5", "-64", "0", "-1", "[1, 2]", "{}", "inf", "-inf", "nan", '""',
              '"x"', "1e300", "99999999999", "[]", '"../../escape"', '"a/b"')


@dataclass(frozen=True)
class Mutation:
    """One changed file in a copy of pipelines/: which file, what was done, and the pipeline to run."""

    kind: str
    file: str  # relative to the copied pipelines folder
    detail: str
    pipeline: str  # the pipeline TOML (relative) that reads the changed file

    def describe(self) -> str:
        return f"{self.kind} in {self.file}: {self.detail} (pipeline {self.pipeline})"


def _typo(word: str, rng: random.Random) -> str:
    position = rng.randrange(len(word))
    edits = [
        word[:position] + word[position + 1:],  # a dropped letter
        word[:position] + rng.choice("aeiorstx_") + word[position:],  # an extra letter
        word + "s",
        word[:-1] if len(word) > 1 else word + "x",
    ]
    if len(word) > 2 and position < len(word) - 1:
        edits.append(word[:position] + word[position + 1] + word[position] + word[position + 2:])  # swapped
    choice = rng.choice([edit for edit in edits if edit and edit != word] or [word + "x"])
    return choice if re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", choice) else word + "x"


def _tables(lines: list[str]) -> list[tuple[int, int]]:
    """(first, end) line ranges of each [table] (header included)."""
    headers = [index for index, line in enumerate(lines) if line.startswith("[")]
    return [(start, headers[i + 1] if i + 1 < len(headers) else len(lines)) for i, start in enumerate(headers)]


def mutate_toml(text: str, rng: random.Random) -> tuple[str, str, str]:
    """(kind, detail, new text) for one edit of a pipeline TOML."""
    lines = text.split("\n")
    key_lines = [index for index, line in enumerate(lines) if KEY_LINE.match(line) and not line.lstrip().startswith("#")]
    inline_lines = [index for index in key_lines if INLINE_KEY.search(lines[index])]  # not "{" inside strings
    kind = rng.choice(["key_typo", "key_typo", "bad_value", "bad_value", "bad_value", "delete_line",
                       "delete_table", "duplicate_key", "byte_flip", "non_utf8", "inline_key_typo",
                       "inline_bad_value", "inline_delete_key", "table_typo"])
    if kind.startswith("inline") and not inline_lines:
        kind = "bad_value"
    if kind == "key_typo":
        index = rng.choice(key_lines)
        indent, key, equals, value = KEY_LINE.match(lines[index]).groups()
        lines[index] = f"{indent}{_typo(key, rng)}{equals}{value}"
        return kind, f"line {index + 1}: {key}", "\n".join(lines)
    if kind == "bad_value":
        index = rng.choice(key_lines)
        indent, key, equals, _ = KEY_LINE.match(lines[index]).groups()
        value = rng.choice(BAD_VALUES)
        lines[index] = f"{indent}{key}{equals}{value}"
        return kind, f"line {index + 1}: {key} = {value}", "\n".join(lines)
    if kind == "delete_line":
        index = rng.choice(key_lines)
        detail = f"line {index + 1}: {lines[index][:40]}"
        del lines[index]
        return kind, detail, "\n".join(lines)
    if kind == "delete_table":
        start, end = rng.choice(_tables(lines))
        detail = lines[start]
        del lines[start:end]
        return kind, detail, "\n".join(lines)
    if kind == "table_typo":
        start, _ = rng.choice(_tables(lines))
        name = lines[start].strip("[]")
        parts = name.split(".")
        part = rng.randrange(len(parts))
        parts[part] = _typo(parts[part], rng)
        lines[start] = f"[{'.'.join(parts)}]"
        return kind, f"[{name}] -> {lines[start]}", "\n".join(lines)
    if kind == "duplicate_key":
        index = rng.choice(key_lines)
        lines.insert(index + 1, lines[index])
        return kind, f"line {index + 1}", "\n".join(lines)
    if kind in ("byte_flip", "non_utf8"):
        data = bytearray(text.encode())
        position = rng.randrange(len(data))
        if kind == "byte_flip":
            data[position] = rng.choice(b"=[]{}\"',#\n 0x.")
        else:
            data[position:position] = b"\xff\xfe"
        return kind, f"byte {position}", bytes(data)
    # an edit inside an inline model config table
    index = rng.choice(inline_lines)
    line = lines[index]
    matches = list(INLINE_KEY.finditer(line))
    match = rng.choice(matches)
    before, key, equals, value = match.groups()
    if kind == "inline_key_typo":
        replacement = f"{before}{_typo(key, rng)}{equals}{value}"
    elif kind == "inline_bad_value":
        replacement = f"{before}{key}{equals}{rng.choice(BAD_VALUES)} "
    else:  # inline_delete_key: keep the separator structure valid
        replacement = before if before.startswith(",") else before.rstrip() + " "
        if not before.startswith(","):  # first key: drop the comma after it too
            rest = line[match.end():]
            line = line[:match.start()] + replacement + rest.lstrip(", ")
            lines[index] = line
            return kind, f"line {index + 1}: {key}", "\n".join(lines)
    lines[index] = line[:match.start()] + replacement + line[match.end():]
    return kind, f"line {index + 1}: {key}", "\n".join(lines)


def mutate_jsonl(text: str, rng: random.Random) -> tuple[str, str, str | bytes]:
    """(kind, detail, new content) for one edit of a prompt file."""
    lines = text.rstrip("\n").split("\n")
    index = rng.randrange(len(lines))
    kind = rng.choice(["torn_line", "invalid_json", "wrong_type", "missing_field", "empty_file", "non_utf8",
                       "not_an_object", "blank_lines"])
    if kind == "torn_line":
        lines[index] = lines[index][: max(1, len(lines[index]) // 2)]
    elif kind == "invalid_json":
        lines[index] = lines[index].replace('"', "'", 2)
    elif kind == "wrong_type":
        lines[index] = re.sub(r'(:\s*)"[^"]*"', r"\g<1>" + rng.choice(["42", "null", "[1]", "{}", "true"]),
                              lines[index], count=1)
    elif kind == "missing_field":
        lines[index] = "{}"
    elif kind == "empty_file":
        return kind, "all rows", ""
    elif kind == "not_an_object":
        lines[index] = rng.choice(["[1, 2]", '"text"', "7", "null"])
    elif kind == "blank_lines":
        lines.insert(index, "   ")
    else:
        data = bytearray("\n".join(lines).encode())
        position = rng.randrange(len(data))
        data[position:position] = b"\xff\xfe"
        return kind, f"byte {position}", bytes(data) + b"\n"
    return kind, f"line {index + 1}", "\n".join(lines) + "\n"


def pipelines_reading(data_file: str) -> list[str]:
    """The shipped pipelines whose text names `data_file` (relative to pipelines/)."""
    name = Path(data_file).name
    return sorted(path.name for path in PIPELINES.glob("*.toml") if name in path.read_text())


def make_mutation(scratch: Path, rng: random.Random, pipelines: list[str]) -> Mutation:
    """Copy pipelines/ into `scratch` and apply one mutation there, to one of `pipelines` (the shipped pipelines
    that plan cleanly here: one whose model package is not installed would fail before the edit is reached) or to a
    data file one of them reads."""
    shutil.copytree(PIPELINES, scratch, dirs_exist_ok=True)
    tomls = sorted(pipelines)
    data_files = sorted(f"data/{path.name}" for path in (PIPELINES / "data").glob("*.jsonl")
                        if set(pipelines_reading(f"data/{path.name}")) & set(pipelines))
    if rng.random() < 0.7 or not data_files:
        file = rng.choice(tomls)
        kind, detail, content = mutate_toml((scratch / file).read_text(), rng)
        pipeline = file
    else:
        file = rng.choice(data_files)
        kind, detail, content = mutate_jsonl((scratch / file).read_text(), rng)
        pipeline = rng.choice(sorted(set(pipelines_reading(file)) & set(pipelines)))
    target = scratch / file
    if isinstance(content, bytes):
        target.write_bytes(content)
    else:
        target.write_text(content)
    return Mutation(kind=kind, file=file, detail=detail, pipeline=pipeline)

"""Read a prompt file into raw rows (one dict per row), keeping each row's position for error messages.

Supported formats, chosen by extension:
- ``.jsonl``: one JSON object per line; rows are numbered by 1-based line. Blank lines are not rows (a file that
  ends with an empty line is normal), every other line must be a JSON object.
- ``.parquet``: one row per table row, numbered by 0-based row index (as ``pandas.DataFrame.iloc`` counts them).
  pyarrow is imported only when a Parquet file is read.

A row that cannot even be parsed comes back as a ``BadRow``; field checks happen later in ``fields.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Union

import attrs

from opdgraph.data.records import BadRow, PromptDataError

SUPPORTED_SUFFIXES = (".jsonl", ".parquet")


@attrs.frozen(kw_only=True)
class RawRow:
    """One parsed row: its number in the file, the "path:row" location string, and the row object."""

    row: int = attrs.field()
    location: str = attrs.field()
    value: Any = attrs.field()


def json_type_name(value: Any) -> str:
    """The JSON name of a Python value's type, so messages speak the language of the file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def read_rows(path: Union[str, Path]) -> Iterator[Union[RawRow, BadRow]]:
    """Yield every row of ``path`` in file order, as a RawRow or (when unparseable) a BadRow."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise PromptDataError(
            f"{path}: unsupported prompt file type {suffix or '(no extension)'!r}; "
            f"use one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    if not path.is_file():
        raise PromptDataError(f"{path}: prompt file not found (paths are resolved relative to the pipeline file)")
    if suffix == ".jsonl":
        return _read_jsonl(path)
    return _read_parquet(path)


def _read_jsonl(path: Path) -> Iterator[Union[RawRow, BadRow]]:
    with path.open("rb") as handle:
        for line_number, raw_line in enumerate(handle, start=1):
            location = f"{path}:{line_number}"
            if line_number == 1 and raw_line.startswith(b"\xef\xbb\xbf"):
                raw_line = raw_line[3:]  # a UTF-8 byte-order mark written by some editors is not content
            try:
                line = raw_line.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as error:
                yield BadRow(location=location, kind="invalid_json", reason=f"not valid UTF-8 ({error.reason} "
                             f"at byte {error.start})")
                continue
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                yield BadRow(location=location, kind="invalid_json",
                             reason=f"invalid JSON: {error.msg} (column {error.colno})")
                continue
            if not isinstance(value, dict):
                yield BadRow(location=location, kind="not_an_object",
                             reason=f"row is a JSON {json_type_name(value)}, expected an object")
                continue
            yield RawRow(row=line_number, location=location, value=value)


def _read_parquet(path: Path) -> Iterator[RawRow]:
    try:
        import pyarrow.parquet as parquet
    except ImportError as error:
        raise PromptDataError(
            f"{path}: reading Parquet prompt files needs pyarrow, which is not installed; run `pip install pyarrow` "
            "(or convert the file to .jsonl)"
        ) from error
    try:
        table = parquet.read_table(path)
    except Exception as error:  # pyarrow raises several unrelated types for corrupt or non-Parquet files
        raise PromptDataError(f"{path}: cannot read as Parquet: {error}") from error
    for index, value in enumerate(table.to_pylist()):
        yield RawRow(row=index, location=f"{path}:row {index}", value=value)

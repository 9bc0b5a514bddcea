"""Answer scoring for eval prompts that carry a reference answer: exact, numeric and boxed matches.

A response is correct when any of these holds, checked in this order:
- boxed: the last `\\boxed{...}` in the response equals the reference (after normalisation);
- numeric: the reference parses as a number and the *last* number in the response equals it (relative 1e-6, so
  "12.0" matches "12"; thousands separators like "1,234" are read as 1234);
- exact: the normalised response equals the normalised reference (case, surrounding space and a final period
  ignored).
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*(?:[eE][-+]?\d+)?|-?\.\d+")


def _normalise(text: str) -> str:
    return text.strip().strip(".").strip().lower()


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").strip())
    except ValueError:
        return None


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, with nested braces balanced; None when there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for index in range(begin, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            if depth == 0:
                return text[begin:index]
            depth -= 1
    return None


def last_number(text: str) -> float | None:
    numbers = [_as_number(match) for match in _NUMBER.findall(text)]
    numbers = [n for n in numbers if n is not None]
    return numbers[-1] if numbers else None


def _numbers_equal(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))


def is_correct(response: str, reference: str) -> bool:
    boxed = last_boxed(response)
    reference_number = _as_number(reference)
    if boxed is not None:
        boxed_number = _as_number(boxed)
        if reference_number is not None and boxed_number is not None:
            return _numbers_equal(boxed_number, reference_number)
        return _normalise(boxed) == _normalise(reference)
    if reference_number is not None:
        found = last_number(response)
        return found is not None and _numbers_equal(found, reference_number)
    return _normalise(response) == _normalise(reference)

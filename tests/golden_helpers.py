"""Golden-file comparison for tests: `check_golden(name, text)` compares with tests/golden/<name>, or rewrites it
when the environment has OPDGRAPH_REGEN_GOLDEN=1 (review the diff before committing).

A regenerated golden records what the code prints now; it is not a check by itself. The plan goldens' memory
numbers are checked by tests/test_saved_bytes.py (measured on CPU) and tests/test_sizing.py (hand-computed):
regenerate a plan golden only together with those."""

from __future__ import annotations

import os
import pathlib

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN_DIR / name
    if os.environ.get("OPDGRAPH_REGEN_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    assert path.exists(), f"missing golden {path}; run with OPDGRAPH_REGEN_GOLDEN=1 to create it"
    expected = path.read_text(encoding="utf-8")
    assert text == expected, f"output differs from golden {path} (OPDGRAPH_REGEN_GOLDEN=1 regenerates it)"

"""`opdgraph plan --format html --measured RUN_DIR`: reads the predicted-vs-measured rows that
`opdgraph run --record-memory` wrote to RUN_DIR/memory.json (opdgraph.runtime.memory_record), so the plan page can
draw them beside the prediction. Torch-free: plain JSON, each row checked, every problem named with the file and row."""

from __future__ import annotations

import json
from pathlib import Path

from opdgraph.errors import RunDirectoryError

RERUN = "run the pipeline with `opdgraph run P.toml --record-memory` to record it"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_measured(run_dir: str) -> list[dict]:
    """The rows of RUN_DIR/memory.json: dicts with step (str), predicted_gib (number) and measured_gib (number, or
    None where nothing was measured: a CPU run)."""
    folder = Path(run_dir).expanduser()
    if not folder.is_dir():
        raise RunDirectoryError(f"--measured {run_dir}: no such run directory; pass the directory of a run ({RERUN})")
    path = folder / "memory.json"
    if not path.is_file():
        raise RunDirectoryError(f"--measured {run_dir}: {path} does not exist (the run did not record memory); {RERUN}")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise RunDirectoryError(f"{path}: cannot read it ({error}); {RERUN}") from error
    except json.JSONDecodeError as error:
        raise RunDirectoryError(f"{path}:{error.lineno}: not valid JSON ({error.msg}); {RERUN} again") from error
    if not isinstance(rows, list):
        raise RunDirectoryError(f"{path}: expected a list of rows (one per plan step), got {type(rows).__name__}; "
                                f"{RERUN} again")
    for number, row in enumerate(rows, 1):
        problem = None
        if not isinstance(row, dict):
            problem = f"expected an object, got {type(row).__name__}"
        elif not isinstance(row.get("step"), str):
            problem = "no 'step' name"
        elif not _number(row.get("predicted_gib")):
            problem = "'predicted_gib' is not a number"
        elif row.get("measured_gib") is not None and not _number(row["measured_gib"]):
            problem = "'measured_gib' is neither a number nor null"
        if problem:
            raise RunDirectoryError(f"{path}: row {number}: {problem}; {RERUN} again")
    return rows

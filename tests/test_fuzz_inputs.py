"""Fuzz: hundreds of generated bad inputs (tests/fuzz_mutations.py) through `opdgraph plan` and `opdgraph run --check`.

Whatever is wrong, the user gets exit 0 (the edit left a valid pipeline) or exit 2 with a message that names where
(the changed file itself, or the config key that decides, such as the memory budget), and never a Python traceback.
`run --check` runs every startup check of a run (run directory, device, tokenizers, every prompt row) without
loading weights, so a data file's rows, which `plan` never reads, are checked too. The commands run in-process
through `opdgraph.cli.main`, the function the console script calls, so an exception that escapes it here is exactly
a traceback a user would see.
"""

from __future__ import annotations

import json
import random

import pytest

from opdgraph.cli import main
from tests.fuzz_mutations import PIPELINES, make_mutation

NUM_MUTATIONS = 320
SEED = 20261202


def _names_a_location(stderr: str, mutation) -> bool:
    from pathlib import Path

    return Path(mutation.file).name in stderr or "pipeline.memory_budget_gib" in stderr


def _run_cli(argv, capsys, mutation, seed, failures: list[str]) -> int | None:
    """The exit code, or None after recording why this outcome is a failure."""
    where = f"seed {seed}: {mutation.describe()}: `opdgraph {argv[0]}`"
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own usage errors
        code = stop.code
    except BaseException as error:  # noqa: BLE001 -- any escape is a traceback the user would see
        capsys.readouterr()
        failures.append(f"{where} raised {type(error).__name__}: {str(error)[:300]}")
        return None
    captured = capsys.readouterr()
    if "Traceback" in captured.err + captured.out:
        failures.append(f"{where} printed a traceback")
    elif code not in (0, 2):
        failures.append(f"{where} exited {code}: {captured.err[:300]}")
    elif code == 2 and not _names_a_location(captured.err, mutation):
        failures.append(f"{where}: the error names no location: {captured.err[:300]}")
    else:
        return code
    return None


@pytest.mark.slow
def test_generated_bad_inputs_never_give_a_traceback(tmp_path, capsys):
    """If this fails, some bad config, model config or data file reaches the user as a Python traceback, or as an
    error that does not say where the problem is (the failure names the seed and the edit to reproduce it)."""
    outcomes: dict[int | None, int] = {0: 0, 2: 0, None: 0}
    failures: list[str] = []
    pipelines = [path.name for path in sorted(PIPELINES.glob("*.toml"))
                 if main(["plan", str(path), "--format", "json", "--out", str(tmp_path / "pristine.json")]) == 0]
    capsys.readouterr()
    assert "tiny.toml" in pipelines, pipelines
    for index in range(NUM_MUTATIONS):
        seed = SEED + index
        scratch = tmp_path / f"m{index}"
        mutation = make_mutation(scratch, random.Random(seed), pipelines)
        pipeline = str(scratch / mutation.pipeline)
        outcomes[_run_cli(["plan", pipeline, "--format", "json", "--out", str(scratch / "plan.json")], capsys,
                          mutation, seed, failures)] += 1
        outcomes[_run_cli(["run", pipeline, "--check", "--set", f"pipeline.output_dir={json.dumps(str(scratch / 'run'))}"],
                          capsys, mutation, seed, failures)] += 1
    assert not failures, f"{len(failures)} of {2 * NUM_MUTATIONS} commands failed:\n" + "\n".join(failures)
    # Most edits must be caught: a fuzz whose mutations all pass would test nothing.
    assert outcomes[2] > NUM_MUTATIONS, outcomes

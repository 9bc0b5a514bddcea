"""Bad inputs through the real command line: each exits 2 with a message that says where and what to do, no traceback.

Table-driven over cases from the reliability issue that no other test file drives through `opdgraph.cli.main` (the
function the console script calls): an output file in a missing folder, a CUDA device on a machine without one,
prompt files that cannot be used, a model config that is not a table. Run directories, checkpoints and config values
have their own tables (test_run_safety.py, test_checkpoint_safety.py, test_config_ranges.py); the fuzz test covers
generated edits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from opdgraph.cli import main

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def _copy_tiny(tmp_path: Path) -> Path:
    shutil.copytree(PIPELINES, tmp_path / "pipelines")
    return tmp_path / "pipelines" / "tiny.toml"


def _empty_train_file(tiny: Path) -> str:
    (tiny.parent / "data" / "tiny_train.jsonl").write_text("")
    return "tiny_train.jsonl"


def _rows_of_the_wrong_kind(tiny: Path) -> str:
    (tiny.parent / "data" / "tiny_train.jsonl").write_text("\n".join(json.dumps({"prompt": 7}) for _ in range(4)))
    return "tiny_train.jsonl"


def _model_config_a_list(tiny: Path) -> str:
    (tiny.parent / "student.json").write_text("[1, 2]")
    text = tiny.read_text()
    start = text.index("config = {", text.index("[models.student]"))
    end = text.index("\n", start)
    tiny.write_text(text[:start] + 'path = "student.json"' + text[end:])
    return "student.json"


# (name, command after the pipeline path, how to break the copied pipeline (returns a text the error must show))
CASES = [
    ("plan --out into a missing folder", ["plan", "{tiny}", "--out", "{tmp}/missing/plan.txt"],
     lambda tiny: "does not exist"),
    ("an empty prompt file", ["run", "{tiny}", "--check"], _empty_train_file),
    ("prompt rows of the wrong type", ["run", "{tiny}", "--check"], _rows_of_the_wrong_kind),
    ("a JSON model config that is a list", ["run", "{tiny}", "--check"], _model_config_a_list),
]


@pytest.mark.parametrize("name, argv, breaks", CASES, ids=[case[0] for case in CASES])
def test_bad_input_exits_2_with_where_and_no_traceback(tmp_path, capsys, name, argv, breaks):
    """If this fails, one of these bad inputs reaches the user as a traceback, or as an error that does not say
    where the problem is, or with an exit code other than 2."""
    tiny = _copy_tiny(tmp_path)
    shown = breaks(tiny)
    out_dir = json.dumps(str(tmp_path / "run"))
    args = [arg.format(tiny=tiny, tmp=tmp_path) for arg in argv]
    if args[0] == "run":
        args += ["--set", f"pipeline.output_dir={out_dir}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and shown in err, err
    assert not (tmp_path / "run").exists()  # a refused start writes nothing


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_exits_2_before_loading_anything(tmp_path, capsys, monkeypatch):
    """If this fails, `device = "cuda"` on a CPU-only machine crashes inside torch (or after loading weights) rather
    than saying what to set."""
    monkeypatch.setattr("opdgraph.models.load_decoder", lambda *a, **k: pytest.fail("weights loaded"))
    tiny = _copy_tiny(tmp_path)
    code = main(["run", str(tiny), "--set", "pipeline.device=cuda",
                 "--set", f"pipeline.output_dir={json.dumps(str(tmp_path / 'run'))}"])
    err = capsys.readouterr().err
    assert code == 2 and "no CUDA device" in err and "pipeline.device" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_triton_loss_kernel_without_cuda_exits_2_before_loading_anything(tmp_path, capsys, monkeypatch):
    """If this fails, `loss.kernel = "triton"` on a machine without CUDA is found only at the first loss, after the
    weights loaded and the run directory was written (a traceback there, and a run left to --restart)."""
    monkeypatch.setattr("opdgraph.models.load_decoder", lambda *a, **k: pytest.fail("weights loaded"))
    tiny = _copy_tiny(tmp_path)
    code = main(["run", str(tiny), "--set", "loss.kernel=triton",
                 "--set", f"pipeline.output_dir={json.dumps(str(tmp_path / 'run'))}"])
    err = capsys.readouterr().err
    assert code == 2 and "loss.kernel" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_liger_kernels_without_cuda_exit_2_before_loading_anything(tmp_path, capsys, monkeypatch):
    """If this fails, models.<name>.kernels = "liger" on a machine without CUDA (device "auto") is found only at the
    first forward, after the weights loaded and the run directory was written."""
    monkeypatch.setattr("opdgraph.models.load_decoder", lambda *a, **k: pytest.fail("weights loaded"))
    tiny = _copy_tiny(tmp_path)
    code = main(["run", str(tiny), "--set", "models.student.kernels=liger",
                 "--set", f"pipeline.output_dir={json.dumps(str(tmp_path / 'run'))}"])
    err = capsys.readouterr().err
    assert code == 2 and "models.student.kernels = 'liger'" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_output_dir_with_a_tilde_is_the_home_folder(tmp_path, capsys, monkeypatch):
    """If this fails, `pipeline.output_dir = "~/runs/x"` writes into a folder literally named `~` (data paths
    expand `~`; the run directory must too)."""
    from opdgraph.config import load_pipeline
    from opdgraph.runtime.run_directory import configured_directory

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_pipeline(str(_copy_tiny(tmp_path)), ['pipeline.output_dir="~/runs/x"'])
    assert configured_directory(cfg) == tmp_path / "home" / "runs" / "x"


def test_run_check_under_torchrun_locks_on_rank_0_only(tmp_path, monkeypatch):
    """If this fails, `torchrun ... -m opdgraph run P --check` has every rank take the run directory's lock, and
    all but one fail on the lock the first one holds."""
    from opdgraph.config import load_pipeline
    from opdgraph.runtime import startup as run

    cfg = load_pipeline(str(_copy_tiny(tmp_path)), [f"pipeline.output_dir={json.dumps(str(tmp_path / 'run'))}"])
    monkeypatch.setattr(run, "open_run_directory", lambda *a, **k: pytest.fail("rank 1 opened the directory"))
    monkeypatch.setenv("RANK", "1")
    assert len(run.check_run(cfg).train_prompts) > 0

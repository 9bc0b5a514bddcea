"""The checkpoint protocol on its own (opdgraph.runtime.checkpoint), without models: damage detection and fallback,
re-saving a step, pruning and temporary folders when a write is cut short, and which config changes a resume may
make (opdgraph.runtime.config_record). The whole-run versions are in test_run_safety.py and test_run_kills.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from opdgraph.errors import CheckpointError
from opdgraph.runtime import checkpoint as ckpt
from opdgraph.runtime.config_record import differences, is_cadence


def _save(run_dir: Path, step: int, *, keep_last: int = 5, weights: bytes | None = None) -> Path:
    def save_student(folder: Path) -> None:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(weights or bytes(range(256)) * 64 + bytes([step]))
        (folder / "config.json").write_text('{"model_type": "llama"}\n')

    return ckpt.save_checkpoint(run_dir, step, save_student=save_student, trainer_state={"step": step, "x": [1.0] * 50},
                                summary={"num_steps": 9}, config_record={"values": {"step.lr": 0.1}, "stage_kinds": {}},
                                keep_last=keep_last)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))  # same size: only a checksum can tell


DAMAGES = {  # name -> (file in the checkpoint, what is done to it, words the message must contain)
    "truncated trainer.pt": ("trainer.pt", _truncate, "trainer.pt has"),
    "empty trainer.pt": ("trainer.pt", lambda p: p.write_bytes(b""), "trainer.pt has 0 bytes"),
    "flipped safetensors bytes": ("student/model.safetensors", _flip_bytes, "student/model.safetensors has changed"),
    "missing state.json": ("state.json", Path.unlink, "state.json is missing"),
    "corrupt state.json": ("state.json", lambda p: p.write_text('{"step": 2, "num_steps": 9, "world_size": 1 '),
                           "state.json has"),
    "corrupt same-size state.json": ("state.json", _flip_bytes, "state.json has changed"),
    "missing manifest": ("manifest.json", Path.unlink, "manifest.json is missing"),
}


@pytest.mark.parametrize("damage_name", DAMAGES)
def test_damaged_checkpoint_is_named_and_skipped(tmp_path, damage_name):
    """Each kind of damage to the newest checkpoint must be detected, named with its path and file, and resume must
    fall back to the older intact one: fails if a damaged checkpoint could be loaded (and train on garbage)."""
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    name, damage, words = DAMAGES[damage_name]
    damage(newest / name)
    step, path, messages = ckpt.resumable_checkpoint(tmp_path)
    assert (step, path) == (1, ckpt.checkpoint_dir(tmp_path, 1))
    assert len(messages) == 1 and str(newest) in messages[0] and words in messages[0], messages
    assert ckpt.damage(path) is None


def test_no_intact_checkpoint_is_an_error_listing_each(tmp_path):
    """With every checkpoint damaged, resume must stop with a CheckpointError naming each, not load one."""
    for step in (1, 2):
        (_save(tmp_path, step) / "trainer.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="every checkpoint is damaged") as error:
        ckpt.resumable_checkpoint(tmp_path)
    assert all(str(ckpt.checkpoint_dir(tmp_path, step)) in str(error.value) for step in (1, 2))
    chosen = ckpt.checkpoint_dir(tmp_path, 2)
    with pytest.raises(CheckpointError, match="is damaged"):  # a checkpoint named explicitly has no fallback
        ckpt.resumable_checkpoint(tmp_path, chosen)


def test_no_checkpoint_at_all_points_to_restart(tmp_path):
    """A run stopped before its first checkpoint must be told how to start over, not just 'not found'."""
    with pytest.raises(CheckpointError, match="--restart"):
        ckpt.resumable_checkpoint(tmp_path)


class Killed(BaseException):
    """Stands for a kill at one instant: nothing after it runs (no except Exception handler catches it)."""


@pytest.mark.parametrize("dies_at_replace", [1, 2])
def test_resaving_a_step_always_keeps_a_complete_copy(tmp_path, monkeypatch, dies_at_replace):
    """Re-saving step 3 and dying at either rename must leave a complete, intact step 3 (after the next start's
    cleanup): fails if the old copy is deleted before the new one is in place."""
    _save(tmp_path, 3, weights=b"old" * 100)
    real_replace, calls = os.replace, []

    def replace(source, target):
        calls.append(source)
        if len(calls) == dies_at_replace:
            raise Killed()
        real_replace(source, target)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(Killed):
        _save(tmp_path, 3, weights=b"new" * 100)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    ckpt.clean_leftovers(tmp_path)
    final = ckpt.checkpoint_dir(tmp_path, 3)
    assert ckpt.damage(final) is None
    assert (final / "student" / "model.safetensors").read_bytes() in (b"old" * 100, b"new" * 100)
    assert not ckpt.leftovers(tmp_path) and not list((tmp_path / "checkpoints").glob(".*"))


def test_resave_replaces_the_old_copy(tmp_path):
    """A completed re-save holds the new bytes and leaves no old copy behind."""
    _save(tmp_path, 3, weights=b"old" * 100)
    final = _save(tmp_path, 3, weights=b"new" * 100)
    assert (final / "student" / "model.safetensors").read_bytes() == b"new" * 100
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000003"]


def test_interrupted_prune_never_leaves_a_complete_marker_without_files(tmp_path, monkeypatch):
    """A kill while pruning deletes files one by one: no `step-N` may be left with COMPLETE and without its
    trainer.pt (resume would pick it), and the next start must remove what is left."""
    _save(tmp_path, 1, keep_last=1)
    real_rmtree = shutil.rmtree

    def dies_halfway(path, *args, **kwargs):
        (Path(path) / "trainer.pt").unlink()
        raise Killed()

    monkeypatch.setattr(ckpt.shutil, "rmtree", dies_halfway)
    with pytest.raises(Killed):
        _save(tmp_path, 2, keep_last=1)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    for marker in (tmp_path / "checkpoints").glob("step-*/COMPLETE"):
        assert ckpt.damage(marker.parent) is None, marker
    assert ckpt.resumable_checkpoint(tmp_path)[0] == 2
    assert ckpt.clean_leftovers(tmp_path) and not ckpt.leftovers(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002"]


def test_failed_write_leaves_no_temporary_folder(tmp_path):
    """A write that fails (or a second Ctrl-C) must remove its .tmp folder and leave no partial checkpoint."""
    def broken_student(folder: Path) -> None:
        folder.mkdir()
        raise Killed()

    with pytest.raises(Killed):
        ckpt.save_checkpoint(tmp_path, 1, save_student=broken_student, trainer_state={}, summary={},
                             config_record={}, keep_last=2)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_leftovers_of_killed_writes_are_cleaned_at_the_next_start(tmp_path):
    """Folders a kill -9 left (.tmp- of a write, .pruned- of a prune, .old- of a re-save whose new copy is in
    place, .old- whose new copy never arrived) must be removed, or restored when they are the step's only copy."""
    _save(tmp_path, 1)
    root = tmp_path / "checkpoints"
    shutil.copytree(ckpt.checkpoint_dir(tmp_path, 1), root / ".old-step-000001-77")
    shutil.copytree(ckpt.checkpoint_dir(tmp_path, 1), root / ".old-step-000002-78")
    (root / ".tmp-step-000003-79" / "student").mkdir(parents=True)
    (root / ".pruned-step-000000-80").mkdir()
    assert ckpt.complete_steps(tmp_path) == [1, 2]  # the lone .old copy of step 2 counts before the cleanup
    done = ckpt.clean_leftovers(tmp_path)
    assert len(done) == 4 and any("restored" in line for line in done)
    assert sorted(p.name for p in root.iterdir()) == ["step-000001", "step-000002"]


def test_newer_checkpoints_are_set_aside_on_resume(tmp_path):
    """Resuming an older checkpoint must move newer ones out of the way: they belong to a history the resumed run
    replaces; left in place, the next resume or the pruning would pick them over the new ones."""
    for step in (1, 2, 3):
        _save(tmp_path, step)
    messages = ckpt.set_aside_newer(tmp_path, 1)
    assert len(messages) == 2 and ckpt.complete_steps(tmp_path) == [1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "set-aside-step-000002", "set-aside-step-000003", "step-000001"]


CADENCE = [("log.every_n_steps", True), ("log.progress", True), ("eval.every_n_steps", True),
           ("checkpoint.every_n_steps", True), ("checkpoint.keep_last", True), ("checkpoint.on_signal", True),
           ("pipeline.device", True), ("pipeline.debug_memory", True), ("pipeline.fit.enabled", True),
           ("models.student.offload_when_idle", True),
           ("step.lr", False), ("step.schedule", False), ("loss.divergence", False), ("pipeline.seed", False),
           ("pipeline.num_steps", False), ("data.prompts_per_step", False), ("eval.num_prompts", False),
           ("teacher_score.micro_batch_tokens", False), ("models.student.dtype", False), ("log.kind", False),
           ('data.file_checksum["data/tiny_train.jsonl"]', False), ("models.student.resolved_shape.layers", False)]


@pytest.mark.parametrize("key, allowed", CADENCE)
def test_which_config_changes_a_resume_accepts(key, allowed):
    """The documented allow-list: interval, display and placement settings only; anything that changes the math or
    the data order must stop a resume (fails if a math change slips through, or a cadence change is refused)."""
    kinds = {"log": "log", "eval": "eval", "checkpoint": "checkpoint", "step": "step", "loss": "loss",
             "teacher_score": "teacher_score"}
    assert is_cadence(key, kinds) is allowed


def test_differences_name_keys_on_either_side():
    """A key present on one side only (a stage added or removed) is a difference, shown as absent."""
    old = {"values": {"a.x": 1, "a.y": [1, 2], "gone.z": True}}
    new = {"values": {"a.x": 1, "a.y": [1, 3], "new.z": json.loads("null")}}
    assert differences(old, new) == [("a.y", [1, 2], [1, 3]), ("gone.z", True, "(absent)"),
                                     ("new.z", "(absent)", None)]


def test_a_setting_newer_than_the_checkpoint_passes_only_at_its_default():
    """If this fails, every setting added to opdgraph stops the resume of every older run (absent before, at its
    default now), or a new setting set on purpose to a non-default value slips through unannounced."""
    from opdgraph.config import load_pipeline
    from opdgraph.runtime.config_record import config_record, is_newer_default

    tiny = Path(__file__).resolve().parents[1] / "pipelines" / "tiny.toml"
    for overrides, expected in (([], True), (["backward.grad_accumulation_dtype=\"model\""], False)):
        new = config_record(load_pipeline(str(tiny), overrides))
        old = {"values": {key: value for key, value in new["values"].items()
                          if key != "backward.grad_accumulation_dtype"}}
        change, = differences(old, new)
        assert change[0] == "backward.grad_accumulation_dtype" and is_newer_default(change, new) is expected


@pytest.mark.parametrize("damaged", [False, True])
def test_restart_hint_is_the_one_given(tmp_path, damaged):
    """No checkpoint, or every one damaged: the error must suggest the restart flags it was given (which name the
    resumed directory when that is not the configured one), not a bare --restart that restarts another directory."""
    if damaged:
        (_save(tmp_path, 1) / "trainer.pt").write_bytes(b"")
    words = "--restart --set 'pipeline.output_dir=/some where'"
    with pytest.raises(CheckpointError, match=f"pass {words} instead of --resume"):
        ckpt.resumable_checkpoint(tmp_path, restart=words)


def test_records_keep_the_layer_kinds_of_hybrid_models_only(tmp_path):
    """If this fails, a checkpoint records a non-hybrid model's layer kinds (which every model's shape has now), and
    every run checkpointed before, whose records hold [] there, is refused on --resume as if its model changed."""
    from opdgraph.config import load_pipeline
    from opdgraph.runtime.config_record import config_record

    pipelines = Path(__file__).resolve().parent.parent / "pipelines"
    plain = config_record(load_pipeline(str(pipelines / "tiny.toml"), []))["values"]
    assert plain["models.student.resolved_shape.layer_types"] == []
    hybrid = load_pipeline(str(pipelines / "qwen35_0b8_from_4b.toml"), [])
    recorded = config_record(hybrid)["values"]["models.student.resolved_shape.layer_types"]
    assert recorded == list(hybrid.shapes["student"].layer_types) and "linear_attention" in recorded

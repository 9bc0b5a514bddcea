"""End to end on CPU: `opdgraph run pipelines/tiny.toml` trains, learns, checkpoints and resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opdgraph.compile import compile_plan
from opdgraph.config import load_pipeline
from opdgraph.errors import RunDirectoryError
from opdgraph.runtime import executor as executor_module
from opdgraph.runtime.run import run_pipeline

TINY = Path(__file__).resolve().parents[1] / "pipelines" / "tiny.toml"
# Wall-clock fields differ between any two runs; everything else must be equal.
TIMING_KEYS = ("seconds", "tokens_per_s")


def _run(tmp_path: Path, name: str, *overrides: str, resume: Path | None = None):
    # On the CPU also where CUDA is: exact resume and the transformers comparison below are CPU claims (a GPU's
    # peak-memory field and kernel choices differ between a fresh and a resumed process).
    cfg = load_pipeline(TINY, [f"pipeline.output_dir={tmp_path / name}", "log.progress=false",
                               "pipeline.device=cpu", *overrides])
    return run_pipeline(cfg, compile_plan(cfg), resume=resume)


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if json.loads(line)["kind"] == kind]
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING_KEYS)} for r in records]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    ctx = _run(tmp, "full", "pipeline.debug_memory=true", "log.sample_every_n_steps=1")
    return tmp, ctx


def test_opd_lowers_heldout_kl(full_run):
    """OPD must move the student toward the teacher on held-out prompts: a real learning signal, with margin."""
    _, ctx = full_run
    before, after = ctx.eval_records[0], ctx.eval_records[-1]
    assert before["label"] == "before" and after["label"] == "final"
    assert after["reverse_kl"] < 0.75 * before["reverse_kl"]
    assert after["forward_kl"] < 0.75 * before["forward_kl"]


def test_plan_releases_really_free(full_run):
    """debug_memory checks each release with weak references; the run got through every release of every step."""
    _, ctx = full_run
    released = set(ctx.buffers.released)
    assert {"rollout.kv_cache", "teacher_hidden", "student_activations", "hidden_grad", "student.grads",
            "eval.kv_cache", "eval.teacher_kv_cache"} <= released
    assert ctx.engine.kv_cache is None  # the KV pool is gone outside rollout
    assert all(p.grad is None for p in ctx.student.parameters())  # gradient buffers are gone after the step


def test_metrics_every_step_and_checkpoint_loads_in_transformers(full_run):
    """Each step writes its record; the final checkpoint is an HF model transformers loads with our logits."""
    import torch
    from transformers import AutoModelForCausalLM

    tmp, ctx = full_run
    train = _records(tmp / "full", "train")
    assert [r["step"] for r in train] == list(range(1, 31))
    assert all(r["skipped"] is None and r["grad_norm"] > 0 for r in train)
    student_dir = tmp / "full" / "checkpoints" / "step-000030" / "student"
    hf = AutoModelForCausalLM.from_pretrained(student_dir, attn_implementation="eager").eval()
    ids = torch.tensor([[1, 5, 9, 200, 17, 3]])
    from opdgraph.models.packing import pack

    input_ids, positions, meta = pack([ids[0].tolist()])
    with torch.no_grad():
        ours = ctx.student.logits(ctx.student.forward_hidden(input_ids, positions, meta))
        theirs = hf(ids).logits[0].float()
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def _samples(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def test_kill_and_resume_equals_uninterrupted(full_run, tmp_path, monkeypatch):
    """A run killed after its step-10 checkpoint (steps 11 to 13 already logged) and resumed must produce the
    uninterrupted run's metrics and samples, every step exactly once: fails if resume repeats or loses log lines."""
    tmp, _ = full_run
    original = executor_module.PlanExecutor.run_training_step

    def killed_at_step_13(self):
        if self.ctx.step == 13:
            raise KeyboardInterrupt("simulated kill")
        original(self)

    monkeypatch.setattr(executor_module.PlanExecutor, "run_training_step", killed_at_step_13)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "killed", "pipeline.debug_memory=true", "log.sample_every_n_steps=1")
    killed_at = [r["step"] for r in _samples(tmp_path / "killed") if r["label"] == "rollout"]
    assert max(killed_at) == 13  # the kill left lines of steps 11-13 after the checkpoint: the case under test
    monkeypatch.setattr(executor_module.PlanExecutor, "run_training_step", original)
    _run(tmp_path, "killed", "pipeline.debug_memory=true", "log.sample_every_n_steps=1", resume=tmp_path / "killed")
    assert _records(tmp_path / "killed", "train") == _records(tmp / "full", "train")
    assert _records(tmp_path / "killed", "eval") == _records(tmp / "full", "eval")
    resumed, full = _samples(tmp_path / "killed"), _samples(tmp / "full")
    assert [r["step"] for r in full if r["label"] == "rollout"] == [step for step in range(1, 31) for _ in range(2)]
    assert resumed == full


def test_existing_run_directory_is_never_overwritten(full_run):
    """Starting a new run over finished results must refuse, naming --resume, rather than lose them."""
    tmp, _ = full_run
    with pytest.raises(RunDirectoryError, match="--resume"):
        _run(tmp, "full")


def test_non_finite_step_is_skipped_logged_and_the_run_goes_on(tmp_path, monkeypatch):
    """A step with a non-finite gradient must be skipped and logged (valid JSON, weights untouched), not end the run."""
    from opdgraph.train import grad_clipping

    original = grad_clipping.clip_grad_norm
    calls = {"count": 0}

    def non_finite_on_second_step(grads, max_norm):
        calls["count"] += 1
        norm, finite = original(grads, max_norm)
        return (norm * float("nan"), False) if calls["count"] == 2 else (norm, finite)

    monkeypatch.setattr(grad_clipping, "clip_grad_norm", non_finite_on_second_step)
    ctx = _run(tmp_path, "skip", "pipeline.num_steps=3", "log.progress=true", "eval.every_n_steps=0")
    lines = (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()
    train = [json.loads(line) for line in lines if json.loads(line)["kind"] == "train"]
    assert [r["skipped"] for r in train] == [None, "non-finite gradient norm", None]
    assert train[1]["grad_norm"] is None and ctx.step == 3
    assert all(json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) for line in lines)

"""The plans and runs of composed pipelines: self-distillation, routed teachers with offloaded weights, and the
errors of bad compositions.

- `frozen = true` equals a run whose teacher is a saved copy of the initial student (the same metrics, step by
  step); `frozen = false` scores with the live student: the same first step, then it follows the trained weights.
- A routed plan's schedule passes the lifetime invariant checker (tests/test_lifetime.py), each teacher's weights
  have the size computed here by hand from its config, and with the teachers offloaded only one teacher's weights
  are on the device at any step: each is reloaded before its own loop and offloaded after it.
- Bad compositions exit 2 with the file and line or the prompt file and row.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from opdgraph.cli import main
from opdgraph.compile import compile_plan
from opdgraph.config import load_pipeline
from opdgraph.lifetime import ScheduleBuffer, ScheduleStep
from tests.test_lifetime import check_invariants

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
QUIET = ["log.progress=false", "pipeline.device=cpu", "eval.every_n_steps=0"]


def _metrics(run_dir: Path) -> list[dict]:
    keep = ("loss", "divergence", "grad_norm")
    return [{key: record[key] for key in keep} for record in map(json.loads, (run_dir / "metrics.jsonl").open())
            if record.get("kind", "train") == "train" and "loss" in record]


def _run(pipeline: Path, run_dir: Path, *overrides: str) -> list[dict]:
    args = ["run", str(pipeline), "--set", f"pipeline.output_dir={run_dir}", "--set", "pipeline.num_steps=3"]
    for override in (*QUIET, *overrides):
        args += ["--set", override]
    assert main(args) == 0
    return _metrics(run_dir)


def test_frozen_self_teacher_equals_a_saved_copy_of_the_initial_student(tmp_path):
    from opdgraph.models.checkpoint import save_pretrained
    from opdgraph.models.loading import load_decoder, load_tokenizer

    cfg = load_pipeline(PIPELINES / "tiny_self.toml")
    student_config = dict(cfg.models["student"].config)
    initial = load_decoder(student_config, dtype=torch.float32, init_seed=cfg.models["student"].init_seed)
    saved = save_pretrained(initial, tmp_path / "initial_student",
                            load_tokenizer(student_config, initial.config.vocab_size))
    frozen = _run(PIPELINES / "tiny_self.toml", tmp_path / "frozen")
    text = (PIPELINES / "tiny_self.toml").read_text().replace(
        '[data]', f'[models.copy]\nrole = "teacher"\ndtype = "float32"\npath = "{saved}"\n\n[data]').replace(
        'model = "student"\nfrozen = true\n', 'model = "copy"\n')
    copied_pipeline = tmp_path / "pipelines" / "copy.toml"
    shutil.copytree(PIPELINES / "data", tmp_path / "pipelines" / "data")
    copied_pipeline.write_text(text)
    copied = _run(copied_pipeline, tmp_path / "copied")
    assert len(frozen) == 3 and frozen == copied  # bit for bit: the same teacher, the same computation

    live = _run(PIPELINES / "tiny_self.toml", tmp_path / "live", "teacher_score.frozen=false")
    assert live[0] == frozen[0]  # at step 1 the live student is the initial student
    assert live[1]["divergence"] != frozen[1]["divergence"]  # then it is the trained one


def test_live_self_teacher_plans_no_weights_of_its_own():
    frozen = compile_plan(load_pipeline(PIPELINES / "tiny_self.toml"))
    live = compile_plan(load_pipeline(PIPELINES / "tiny_self.toml", ["teacher_score.frozen=false"]))
    assert "student.initial.weights" in frozen.buffers and "student.initial.weights" not in live.buffers
    assert live.step("teacher_score").reads[0] == "student.weights"
    student_bytes = frozen.buffers["student.weights"].bytes
    assert frozen.buffers["student.initial.weights"].bytes == student_bytes
    assert frozen.peak_bytes - live.peak_bytes == student_bytes  # the copy is held at every step


def _llama_parameters(config: dict) -> int:
    """Parameter count of a llama config, written out here from the architecture (not from opdgraph)."""
    h, i, layers, v = (config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
    head_dim = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * i + 2 * h
    embeddings = v * h * (1 if config.get("tie_word_embeddings") else 2)
    return layers * per_layer + embeddings + h


def _schedule(plan):
    steps = [ScheduleStep(step.name, step.loops, step.reads, step.writes) for step in plan.steps]
    buffers = [ScheduleBuffer(b.name, b.bytes, b.lifetime == "held", b.offload_when_idle, b.spans_loops)
               for b in plan.buffers.values() if b.device == "device"]
    return steps, buffers


def test_routed_plan_brings_one_teacher_in_at_a_time():
    cfg = load_pipeline(PIPELINES / "tiny_routed.toml", ["models.chat_teacher.offload_when_idle=true",
                                                         "models.math_teacher.offload_when_idle=true"])
    plan = compile_plan(cfg)
    check_invariants(*_schedule(plan))
    for model in ("chat_teacher", "math_teacher"):
        assert plan.buffers[f"{model}.weights"].bytes == 4 * _llama_parameters(dict(cfg.models[model].config))
    names = [step.name for step in plan.steps]
    for group, model in (("chat", "chat_teacher"), ("math", "math_teacher")):
        buffer = f"{model}.weights"
        reloaded = [step.name for step in plan.steps if buffer in step.reloads]
        offloaded = [step.name for step in plan.steps if any(r.buffer == buffer and r.action == "offload"
                                                             for r in step.releases)]
        assert reloaded == [f"teacher_score.{group}"]
        assert offloaded == [f"{group}/backward"]  # after its own loop (held buffers move once per loop)
        loop_steps = [name for name in names if name.startswith(f"{group}/")]
        assert loop_steps == [f"{group}/loss.student_forward", f"{group}/loss", f"{group}/backward"]
    for index in range(len(plan.steps)):
        on_device = [name for name in ("chat_teacher.weights", "math_teacher.weights")
                     if _live_at(plan, name, index)]
        assert len(on_device) <= 1, (plan.steps[index].name, on_device)


def _live_at(plan, buffer: str, index: int) -> bool:
    """Whether `buffer` is on the device during step `index`, replayed from the plan's reloads and offloads."""
    live = False
    for position, step in enumerate(plan.steps):
        if buffer in step.reloads or buffer in step.allocates:
            live = True
        if position == index:
            return live
        if any(release.buffer == buffer for release in step.releases):
            live = False
    return live


def test_two_teacher_plan_with_offloaded_weights_renders(capsys):
    assert main(["plan", str(PIPELINES / "tiny_routed.toml"), "--set", "models.chat_teacher.offload_when_idle=true",
                 "--set", "models.math_teacher.offload_when_idle=true"]) == 0
    text = capsys.readouterr().out
    assert "chat_teacher.weights" in text and "math/loss" in text and " L " in text


def _copy(tmp_path: Path, name: str) -> Path:
    shutil.copytree(PIPELINES, tmp_path / "pipelines")
    return tmp_path / "pipelines" / name


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def _rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


CASES = {
    "unknown route value": ("tiny_routed.toml", lambda p: _rows(
        p.parent / "data" / "tiny_train.jsonl", [{"prompt": "Hi.", "category": "chat"},
                                                 {"prompt": "Sum?", "category": "poetry"}]),
        ["tiny_train.jsonl:2", "'poetry' names no teacher", "chat, math"]),
    "missing route field": ("tiny_routed.toml", lambda p: _rows(
        p.parent / "data" / "tiny_train.jsonl", [{"prompt": "Hi."}]),
        ["tiny_train.jsonl:1", "'category' (loss.route_field, set at tiny_routed.toml:", "is missing"]),
    "missing context field": ("tiny_context.toml", lambda p: _rows(
        p.parent / "data" / "tiny_train.jsonl", [{"prompt": "Hi.", "category": "chat"}, {"prompt": "Yo."}]),
        ["tiny_train.jsonl:2", "needs field 'category'"]),
    "teacher names an unknown model": ("tiny_routed.toml", lambda p: _edit(p, 'model = "math_teacher"',
                                                                          'model = "maths_teacher"'),
                                       ["tiny_routed.toml:", "no [models.maths_teacher]", "did you mean"]),
    "context longer than the teacher's positions": ("tiny_context.toml", lambda p: _edit(
        p, "max_prompt_tokens = 128", "max_prompt_tokens = 500"),
        ["tiny_context.toml:", "teacher_score.max_prompt_tokens + rollout.max_new_tokens = 524", "at most 488"]),
    "teacher prompt over its limit": ("tiny_context.toml", lambda p: _edit(
        p, "max_prompt_tokens = 128", "max_prompt_tokens = 70"),
        ["tiny_train.jsonl:1", "the prompt [teacher_score] sees is", "over its limit of 70"]),
    "mixture weights not summing to one": ("tiny_mixture.toml", lambda p: _edit(
        p, "mixture_weight = 0.3", "mixture_weight = 0.2"),
        ["tiny_mixture.toml:", "must sum to 1", "0.7 + 0.2 = 0.9"]),
    "two teachers, no way to combine": ("tiny_mixture.toml", lambda p: _edit(p, "mixture_weight = 0.3\n", ""),
                                        ["tiny_mixture.toml:", "route_field", "missing on [teacher_score.b]"]),
    "a route value scored twice": ("tiny_routed.toml", lambda p: _edit(
        p, 'model = "math_teacher"', 'model = "math_teacher"\nroute = ["chat"]'),
        ["tiny_routed.toml:", "'chat' is scored by both"]),
    "live self-teacher without context": ("tiny_self.toml", lambda p: _edit(
        p, 'frozen = true\nmicro_batch_tokens = 768\nsystem_prompt = "Answer in one word."',
        'frozen = false\nmicro_batch_tokens = 768'), ["tiny_self.toml:", "divergence is zero"]),
    "frozen on a teacher model": ("tiny_context.toml", lambda p: _edit(
        p, "[teacher_score]\n", "[teacher_score]\nfrozen = true\n"), ["tiny_context.toml:", "remove frozen"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_compositions_are_clear_errors(case, tmp_path, capsys):
    pipeline, edit, expected = CASES[case]
    path = _copy(tmp_path, pipeline)
    edit(path)
    code = main(["run", str(path), "--check", "--set", f"pipeline.output_dir={tmp_path / 'run'}"])
    captured = capsys.readouterr()
    message = captured.err + captured.out
    assert code == 2, message
    assert "Traceback" not in message
    for part in expected:
        assert part in message, (part, message)

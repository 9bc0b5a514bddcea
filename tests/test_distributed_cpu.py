"""Data parallel on CPU: 2 gloo ranks (torchrun) must train exactly as 1 process on the same global batch.

The 2-rank runs are launched by torchrun with this file as the worker script (see `_worker` at the bottom): one
launch trains step 1 from scratch and, in the same process group, resumes a 1-process checkpoint for step 2. The
1-process runs happen in the pytest process. Compared: the gathered HF weights, the gathered optimizer moments
(exp_avg is proportional to the gradient, so it catches a mean-instead-of-sum or a wrong token normalisation, which
AdamW's first, sign-like update would hide), and the logged global loss and gradient norm.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TINY = Path(__file__).resolve().parents[1] / "pipelines" / "tiny.toml"
# Small micro-batches so ranks hold different numbers of them (the padding path), few eval tokens for speed.
# AdamW's eps is raised from 1e-8: its first update, lr * g / (|g| + eps), turns the last-bit rounding of
# gradient entries that nearly cancel (|g| ~ 1e-8) into visible weight differences, in any two summation orders.
OVERRIDES = ["step.warmup_steps=0", "step.eps=1e-6", "log.progress=false", "pipeline.device=cpu",
             "teacher_score.micro_batch_tokens=160", "rollout.max_new_tokens=16", "eval.num_prompts=2",
             "eval.max_new_tokens=4", "checkpoint.every_n_steps=1", "checkpoint.keep_last=4"]
RELATIVE = 1e-5


def _run(output_dir: Path, num_steps: int, resume: Path | None = None, world_size: int = 1, *extra: str,
         allow_config_change: bool = False):
    from opdgraph.compile import compile_plan
    from opdgraph.config import load_pipeline
    from opdgraph.runtime.run import run_pipeline

    cfg = load_pipeline(TINY, [*OVERRIDES, f"pipeline.output_dir={output_dir}", f"pipeline.num_steps={num_steps}",
                               *extra])
    return run_pipeline(cfg, compile_plan(cfg, world_size=world_size), resume=resume,
                        allow_config_change=allow_config_change)


def _copy_run(source: Path, target: Path) -> Path:
    """A copy of a run directory, to resume one of its checkpoints without continuing the source run itself (a
    resume writes into the directory it resumes)."""
    import shutil

    shutil.copytree(source, target)
    return target


def _torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def _checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(checkpoint / "student" / "model.safetensors")


def _optimizer(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "trainer.pt", map_location="cpu", weights_only=False)["optimizer"]


def _train_record(run_dir: Path, step: int) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in records if r["kind"] == "train" and r["step"] == step)


def _assert_close(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor], what: str) -> None:
    assert set(actual) == set(expected), what
    for name, tensor in expected.items():
        error = (actual[name].double() - tensor.double()).abs().max().item()
        scale = tensor.double().abs().max().item()
        assert error <= RELATIVE * max(scale, 1e-12), f"{what} {name}: max error {error:.3g} vs scale {scale:.3g}"


def _assert_same_step(reference: Path, candidate: Path, step: int) -> None:
    _assert_close(_weights(_checkpoint(reference, step)), _weights(_checkpoint(candidate, step)), "weights")
    expected, actual = _optimizer(_checkpoint(reference, step)), _optimizer(_checkpoint(candidate, step))
    assert actual["steps"] == expected["steps"]
    for key in ("exp_avg", "exp_avg_sq"):
        _assert_close(expected[key], actual[key], key)
    for key in ("loss", "grad_norm", "response_tokens"):
        want, got = _train_record(reference, step)[key], _train_record(candidate, step)[key]
        assert got == pytest.approx(want, rel=RELATIVE), key


def _initial_student_weights() -> dict[str, torch.Tensor]:
    from opdgraph.config import load_pipeline
    from opdgraph.runtime.model_loading import load_models

    cfg = load_pipeline(TINY, OVERRIDES)
    student, _ = load_models(cfg.models, Path(cfg.base_dir), torch.device("cpu"))["student"]
    return {name: tensor.detach() for name, tensor in student.state_dict().items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    _run(root / "one", num_steps=2)
    launched = _torchrun("train", str(root), str(_checkpoint(_copy_run(root / "one", root / "one_to_two"), 1)))
    assert launched.returncode == 0, launched.stderr[-4000:]
    return root


def test_two_ranks_equal_one_process(runs):
    """2 ranks on the same global batch must apply the 1-process update (weights, AdamW moments, loss, grad norm):
    fails if the token normalisation is per rank, gradients are averaged instead of summed, clipping uses a local
    norm, or the optimizer's shards or gathered checkpoint are misaligned."""
    _assert_same_step(runs / "one", runs / "two", step=1)
    _assert_same_step(runs / "one", runs / "two_per_layer", step=1)  # FSDP's default schedule, the plan's other one
    # The comparison is meaningful only if the step moved the weights far beyond the tolerance.
    initial, trained = _initial_student_weights(), _weights(_checkpoint(runs / "one", 1))
    moved = max((trained[f"model.{n}"] - t).abs().max().item() / t.abs().max().item() for n, t in initial.items())
    assert moved > 100 * RELATIVE


def test_resume_across_world_sizes(runs):
    """A 1-process checkpoint resumed on 2 ranks, and a 2-rank checkpoint resumed on 1 process, must both continue
    exactly as the uninterrupted 1-process run: fails if checkpoints hold per-rank shards or resume re-shards wrong."""
    _assert_same_step(runs / "one", runs / "one_to_two", step=2)
    # The 2-rank run was configured for 1 step: going on to 2 is a config change, accepted on purpose.
    _run(runs / "two_to_one", 2, _checkpoint(_copy_run(runs / "two", runs / "two_to_one"), 1),
         allow_config_change=True)
    _assert_same_step(runs / "one", runs / "two_to_one", step=2)


def test_only_rank_0_reports(runs):
    """`[log] report_to` under torchrun: one TensorBoard event file, rank 0's, with the global loss metrics.jsonl
    has; fails if every rank opens the trackers (two files, or per-rank losses)."""
    import numpy as np

    pytest.importorskip("tensorboard")
    from tracker_readers import tensorboard_scalars

    folder = runs / "two" / "tensorboard"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1
    assert tensorboard_scalars(folder)["train/loss"] == [(1, float(np.float32(_train_record(runs / "two", 1)["loss"])))]


def test_plan_per_rank_sizes():
    """The 2-rank plan shards the student's held state and adds the gather and communication buffers; fails if the
    plan ignores the world size (and so over- or under-predicts a rank's memory)."""
    from opdgraph.compile import compile_plan
    from opdgraph.config import load_pipeline

    cfg = load_pipeline(TINY, [f"models.student.dtype=bfloat16"])
    one, two = compile_plan(cfg), compile_plan(cfg, world_size=2)
    for name in ("student.weights", "student.master_weights", "student.optimizer_state"):
        assert two.buffers[name].bytes == -(-one.buffers[name].bytes // 2)
    assert two.buffers["student.gathered_weights"].bytes == one.buffers["student.weights"].bytes
    assert two.facts["rollout.sequences"] * 2 == one.facts["rollout.sequences"]
    assert "student.gathered_weights" not in one.buffers and "world_size" not in one.facts
    assert "student.fsdp_comm" in two.buffers
    with pytest.raises(ValueError, match="not divisible by 3 ranks"):
        compile_plan(cfg, world_size=3)


def test_plan_student_gather_schedules():
    """Per step, the weights gathered for rollout stay through the backward and whole gradients span the
    micro-batch loop, freed before the optimizer step; per layer, the gathered weights go after rollout and each
    micro-batch gathers and reduces: fails if either schedule's memory or exchanges are planned wrong."""
    from opdgraph.compile import compile_plan
    from opdgraph.config import load_pipeline
    from opdgraph.placement import Placement

    # Gradient sums in the model dtype, so whole gradients are P x d like the weights (the fp32 sums' sizes:
    # tests/test_grad_accumulation.py).
    cfg = load_pipeline(TINY, ["models.student.dtype=bfloat16", "teacher_score.micro_batch_tokens=160",
                               "backward.grad_accumulation_dtype=model"])
    per_step, per_layer = (compile_plan(cfg, Placement(student_gather=gather), world_size=2)
                           for gather in ("step", "layer"))
    shape = cfg.shapes["student"]
    weights = shape.parameter_count() * 2
    assert per_step.buffers["student.unsharded_grads"].bytes == weights
    assert per_step.buffers["student.unsharded_grads"].spans_loops
    assert "student.unsharded_grads" not in per_layer.buffers
    assert per_step.buffers["student.fsdp_comm"].bytes < per_layer.buffers["student.fsdp_comm"].bytes
    # The root is reduce-scattered last, beside the previous layer's buffer: both must fit in the exchange buffer
    # (Qwen2.5-1.5B: the 151,936-token embedding is 5 layers' worth).
    qwen = load_pipeline(TINY.parent / "qwen25_1b5_from_7b.toml", [])
    big_root = compile_plan(qwen, Placement(student_gather="step"), world_size=2)
    qwen_shape, dtype_bytes = qwen.shapes["student"], qwen.models["student"].dtype_bytes
    layer_bytes = qwen_shape.layer_parameters() * dtype_bytes
    root_bytes = qwen_shape.parameter_count() * dtype_bytes - qwen_shape.layers * layer_bytes
    assert root_bytes > 2 * layer_bytes
    assert big_root.buffers["student.fsdp_comm"].bytes >= root_bytes + layer_bytes

    def freed_after(plan, name):
        return [step.name for step in plan.steps if any(r.buffer == name for r in step.releases)]

    assert freed_after(per_step, "student.gathered_weights") == ["backward"]
    assert freed_after(per_layer, "student.gathered_weights") == ["rollout.decode"]
    first_in_loop = next(step for step in per_step.steps if step.loops)
    assert "student.unsharded_grads" in first_in_loop.allocates  # before the first iteration, not per backward
    assert freed_after(per_step, "student.unsharded_grads") == ["backward"]
    loss_step = per_step.step("loss")
    assert loss_step.live_bytes - per_layer.step("loss").live_bytes == weights + weights - (
        per_layer.buffers["student.fsdp_comm"].bytes)  # whole weights + whole grads, minus the per-layer buffers
    micro = per_step.facts["train.num_micro_batches"]
    assert micro > 1

    def exchanges(plan):
        return sorted((t.step, t.direction, t.bytes) for t in plan.transfers if t.buffer.startswith("student."))

    half = weights // 2
    assert exchanges(per_step) == [("backward", "reduce_scatter", half), ("rollout.prefill", "all_gather", half)]
    assert exchanges(per_layer) == [("backward", "all_gather", half * micro), ("backward", "reduce_scatter", half * micro),
                                    ("loss.student_forward", "all_gather", half * micro),
                                    ("rollout.prefill", "all_gather", half)]


def test_fit_gathers_per_layer_only_when_per_step_does_not_fit():
    """The per-step schedule is the default and the search keeps it wherever it fits (the roofline predicts both
    the same); a budget between the two peaks must give the per-layer one, and one process never searches it."""
    from opdgraph.compile import compile_plan
    from opdgraph.config import load_pipeline
    from opdgraph.fit import fit_plan
    from opdgraph.placement import Placement

    qwen = TINY.parent / "qwen25_1b5_from_7b.toml"
    cfg = load_pipeline(qwen, [])
    per_step, per_layer = (compile_plan(cfg, Placement(student_gather=gather), world_size=2)
                           for gather in ("step", "layer"))
    assert per_step.step_seconds == pytest.approx(per_layer.step_seconds)
    assert per_layer.peak_bytes < per_step.peak_bytes
    tight_gib = (per_step.peak_bytes - 1) / 2**30
    keep_only = ['pipeline.fit.forbid=["teacher_weights.offload", "teacher_weights.stream", "teacher_weights.shard", '
                 '"optimizer_state.offload", "activation_checkpointing.on"]', "pipeline.fit.micro_batch_tokens=[8192]",
                 "pipeline.fit.chunk_tokens=[1024]", "pipeline.fit.max_num_seqs=[128]"]
    roomy = fit_plan(load_pipeline(qwen, keep_only), world_size=2)
    assert roomy.decisions.student_gather == "step" and "student.unsharded_grads" in roomy.plan.buffers
    tight = fit_plan(load_pipeline(qwen, [*keep_only, f"pipeline.memory_budget_gib={tight_gib}"]), world_size=2)
    assert tight.fits and tight.decisions.student_gather == "layer"
    assert "student.unsharded_grads" not in tight.plan.buffers
    one = fit_plan(load_pipeline(qwen, keep_only), world_size=1)
    assert {c.decisions.student_gather for c in one.candidates} == {"step"}


@pytest.mark.parametrize("pinned", ["pipeline.fit.student_gather=layer", "pipeline.fit.student_gather=step",
                                    'pipeline.fit.forbid=["student_gather.step"]'])
def test_one_process_plan_ignores_student_gather(pinned):
    """Pinning (or forbidding) the FSDP schedule of a multi-rank run must leave a one-process plan as configured:
    fails if the pin counts as a forced fit decision there, which starts the fit search and lets it change the
    micro-batch size, loss chunk or rollout concurrency of a plan that already fits."""
    from opdgraph.config import load_pipeline
    from opdgraph.fit import fit_plan

    pipeline = TINY.parent / "qwen25_1b5_from_7b.toml"
    configured = fit_plan(load_pipeline(pipeline, []), world_size=1)
    assert not configured.searched and not configured.plan.over_budget  # the premise: it fits as configured
    pinned_result = fit_plan(load_pipeline(pipeline, [pinned]), world_size=1)
    assert not pinned_result.searched
    assert pinned_result.plan.facts == configured.plan.facts


@pytest.fixture(scope="module")
def schedule_report(tmp_path_factory):
    """One torchrun launch for the gradient checks of `_schedule_worker` (a launch costs seconds)."""
    out = tmp_path_factory.mktemp("schedule")
    launched = _torchrun("schedule", str(out), timeout=180)
    assert launched.returncode == 0, launched.stderr[-4000:]
    return json.loads((out / "schedule.json").read_text())


def test_gradients_reduced_once_per_step(schedule_report):
    """Under the per-step schedule the sharded gradients stay empty until the last micro-batch's backward, which
    reduce-scatters the sum of all micro-batches: fails if an earlier backward reduces (the exchange the schedule
    saves) or the accumulated gradients are lost or counted twice (checked against one unsharded process)."""
    assert schedule_report["grads_before_last"] == [False, False]
    assert schedule_report["max_relative_error"] < 1e-5


@pytest.mark.parametrize("gather", ["step", "layer"])
def test_sharded_fp32_accumulation(schedule_report, gather):
    """A bf16 student sharded over 2 ranks, 32 micro-batches of the runtime's two-stage backward (StudentGradients
    folding FSDP's reduced shards, the lm_head's analytic gradient in its full fp32 accumulator): the gathered fp32
    sums must match the float64 gradient about as well as one unsharded process summing in fp32 does, clearly better
    than bf16 sums, and give the same global clipping norm. Fails if a schedule sums micro-batches in bf16, the
    sharded lm_head gradient is rounded before it is added, or the norm misses the other rank's shard."""
    errors = schedule_report["fp32_accumulation"]
    print(f"relative L2 error vs float64: {errors}")
    assert errors[f"{gather}/float32"] < 1.5 * errors["one/float32"], errors
    assert errors[f"{gather}/float32"] < 0.8 * errors[f"{gather}/model"], errors
    assert errors[f"norm/{gather}"] < 1e-3, errors
    assert schedule_report["lm_head_fold_exact"], "the sharded lm_head gradient was not added in fp32"


def test_ranks_skip_a_non_finite_update_together(schedule_report):
    """An update that is non-finite on one rank's shard only must be skipped by every rank, none of which changes its
    state: fails if the finiteness check is not all-reduced (ranks would then hold different models)."""
    assert schedule_report["skip_decision"] == {"any_rank_applied": False, "any_rank_changed": False}


def _schedule_worker(out: Path) -> None:
    """Three micro-batches on a sharded tiny student (each rank its own) under begin_step_gather, against the sum of
    the same six micro-batches' gradients in one unsharded copy."""
    import copy

    import torch.distributed as dist

    from opdgraph.models.decoder import DecoderLM
    from opdgraph.models.packing import pack
    from opdgraph.models.tiny_configs import tiny_config
    from opdgraph.models.config import decoder_config_from_hf
    from opdgraph.runtime import distributed, fsdp

    distributed.init_distributed("cpu")
    torch.manual_seed(0)
    model = DecoderLM(decoder_config_from_hf(tiny_config("qwen2")))
    reference = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    batches = [[torch.randint(0, 200, (9,), generator=generator).tolist()] for _ in range(6)]

    def loss_of(net, tokens):
        hidden = net.forward_hidden(*pack(tokens, device=torch.device("cpu")))
        return (hidden.float() ** 2).mean()

    for tokens in batches:
        loss_of(reference, tokens).backward()
    fsdp.shard_student(model)
    fsdp.begin_step_gather(model)
    mine = batches[distributed.rank()::2]
    seen = []
    for index, tokens in enumerate(mine):
        fsdp.sync_gradients_if_last(model, index, len(mine))
        loss_of(model, tokens).backward()
        if index < len(mine) - 1:  # the sharded parameters (what the optimizer reads) get a gradient only by reduction
            groups = [unit._get_fsdp_state()._fsdp_param_group for unit in (model, *model.layers)]
            seen.append(any(p.sharded_param.grad is not None for group in groups for p in group.fsdp_params))
    fsdp.end_step_gather(model)
    worst = 0.0
    for (name, param), expected in zip(model.named_parameters(), reference.parameters()):
        full = param.grad.full_tensor()
        worst = max(worst, ((full - expected.grad).abs().max() / expected.grad.abs().max().clamp_min(1e-12)).item())
    report = {"grads_before_last": seen, "max_relative_error": worst, "fp32_accumulation": _fp32_sums(),
              "lm_head_fold_exact": _lm_head_fold_is_exact(), "skip_decision": _skip_decision()}
    if distributed.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "schedule.json").write_text(json.dumps(report))
    dist.barrier()
    distributed.shutdown()


FP32_MICRO_BATCHES, FP32_TOKENS = 32, 12


def _two_stage_micro_batch(model, tokens, gradients, count) -> None:
    """What the runtime does per micro-batch: the backbone forward, the loss on detached final hidden states and
    lm_head with the lm_head gradient added into StudentGradients.lm_head(), one backward with dLoss/dhidden."""
    from opdgraph.models.packing import pack

    hidden = model.forward_hidden(*pack([tokens], device=torch.device("cpu")))
    detached = hidden.detach().float().requires_grad_()
    head = model.lm_head_weight.detach().float().requires_grad_()
    targets = torch.tensor(tokens[1:] + tokens[:1])
    loss = -torch.log_softmax(detached @ head.T, dim=-1)[torch.arange(len(tokens)), targets].sum() / count
    loss.backward()
    gradients.lm_head().add_(head.grad)
    hidden.backward(detached.grad.to(hidden.dtype))


def _fp32_sums() -> dict[str, float]:
    """Relative L2 error vs float64 of the gathered gradient sums: each schedule with fp32 and with model-dtype
    (bf16) sums, one unsharded process for comparison, and the clipping norm's relative error."""
    import copy

    from opdgraph.models.loading import load_decoder
    from opdgraph.models.packing import pack
    from opdgraph.models.tiny_configs import tiny_config
    from opdgraph.runtime import distributed, fsdp
    from opdgraph.runtime.buffers import BufferTable
    from opdgraph.runtime.gradients import StudentGradients
    from opdgraph.train.grad_clipping import clip_grad_norm
    from opdgraph.train.optimizer_layout import _gathered

    base = load_decoder(tiny_config("qwen2"), dtype=torch.bfloat16)  # tied: the lm_head joins the embedding
    generator = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 8, (FP32_TOKENS,), generator=generator).tolist() for _ in range(FP32_MICRO_BATCHES)]
    count = FP32_MICRO_BATCHES * FP32_TOKENS
    reference = copy.deepcopy(base).double()
    for tokens in batches:
        hidden = reference.forward_hidden(*pack([tokens], device=torch.device("cpu")))
        targets = torch.tensor(tokens[1:] + tokens[:1])
        logp = torch.log_softmax(hidden @ reference.lm_head_weight.T, dim=-1)
        (-logp[torch.arange(len(tokens)), targets].sum() / count).backward()
    expected = {name: param.grad for name, param in reference.named_parameters()}
    scale = sum((grad ** 2).sum() for grad in expected.values()).sqrt()

    def error(got):
        return float(sum(((got[name].double() - want) ** 2).sum() for name, want in expected.items()).sqrt() / scale)

    report = {}
    mine = batches[distributed.rank()::2]
    for gather in ("step", "layer"):
        for fp32 in (True, False):
            model = copy.deepcopy(base)
            fsdp.shard_student(model, reduce_dtype=torch.float32 if fp32 and gather == "step" else None)
            gradients = StudentGradients(model, BufferTable(), "student.grads", fp32=fp32)
            if gather == "step":
                fsdp.begin_step_gather(model)
            for index, tokens in enumerate(mine):
                if gather == "step":
                    fsdp.sync_gradients_if_last(model, index, len(mine))
                _two_stage_micro_batch(model, tokens, gradients, count)
            if gather == "step":
                fsdp.end_step_gather(model)
            grads = gradients.finish()
            params = dict(model.named_parameters())
            report[f"{gather}/{'float32' if fp32 else 'model'}"] = error(
                {name: _gathered(params[name], grad.to_local()) for name, grad in grads.items()})
            if fp32:
                norm, _ = clip_grad_norm(list(grads.values()), 0.0)
                report[f"norm/{gather}"] = abs(float(norm) / float(scale) - 1.0)
    model = copy.deepcopy(base)
    gradients = StudentGradients(model, BufferTable(), "student.grads", fp32=True)
    for tokens in batches:
        _two_stage_micro_batch(model, tokens, gradients, count)
    report["one/float32"] = error(gradients.finish())
    return report


def _skip_decision() -> dict[str, bool]:
    """An update that would overflow one weight of rank 1's shard only: every rank must skip the step and keep its
    masters, moments and step counts bit for bit (the finiteness flag is all-reduced)."""
    import copy

    import torch.distributed as dist

    from opdgraph.models.loading import load_decoder
    from opdgraph.models.tiny_configs import tiny_config
    from opdgraph.runtime import distributed, fsdp
    from opdgraph.train.optimizer import MasterAdamW

    model = copy.deepcopy(load_decoder(tiny_config("qwen2"), dtype=torch.bfloat16))
    fsdp.shard_student(model)
    optimizer = MasterAdamW(list(model.named_parameters()), lr=1e-3)
    for param in model.parameters():
        param.grad = torch.distributed.tensor.DTensor.from_local(torch.ones_like(param.to_local()),
                                                                 param.device_mesh, param.placements,
                                                                 shape=param.shape, stride=param.stride())
    if distributed.rank() == 1:
        optimizer.masters["norm.weight"][0] = 3e38  # finite; the check's margin flags anything over half the max
    before = copy.deepcopy((optimizer.masters, optimizer.exp_avg, optimizer.exp_avg_sq, optimizer.steps))
    applied = optimizer.step()
    after = (optimizer.masters, optimizer.exp_avg, optimizer.exp_avg_sq)
    unchanged = optimizer.steps == before[3] and all(torch.equal(a[name], b[name]) for a, b in zip(after, before)
                                                      for name in a)
    votes = torch.tensor([int(applied), int(not unchanged)])
    dist.all_reduce(votes)
    return {"any_rank_applied": bool(votes[0]), "any_rank_changed": bool(votes[1])}


def _lm_head_fold_is_exact() -> bool:
    """add_full_grad into a sharded fp32 accumulator: the all-reduced full fp32 gradient's rows, added without
    rounding (1 + 2^-12 per rank is not a bf16 value; the sum over 2 ranks must arrive exactly)."""
    import copy

    from opdgraph.models.loading import load_decoder
    from opdgraph.models.tiny_configs import tiny_config
    from opdgraph.runtime import fsdp
    from opdgraph.train.optimizer_layout import _gathered

    model = copy.deepcopy(load_decoder(tiny_config("qwen2"), dtype=torch.bfloat16))
    fsdp.shard_student(model)
    param = model.embed_tokens.weight
    accumulator = torch.zeros(param.to_local().shape, dtype=torch.float32)
    fsdp.add_full_grad(param, torch.full(param.shape, 1 + 2.0 ** -12), into=accumulator)
    return bool((_gathered(param, accumulator) == 2 * (1 + 2.0 ** -12)).all())


def test_failing_rank_is_named(tmp_path):
    """An exception on rank 1 only must surface as `[rank 1] ...` and end the whole job (rank 0 waits in a
    collective and must not hang): fails if errors lose their rank or a dead peer leaves the others blocked."""
    launched = _torchrun("fail", timeout=120)
    assert launched.returncode != 0
    assert "[rank 1] ValueError: rank 1 read a bad shard" in launched.stderr


def _worker(mode: str, *args: str) -> None:
    """Runs on every rank under torchrun."""
    from opdgraph.runtime import distributed

    if mode == "fail":
        distributed.init_distributed("cpu")
        with distributed.report_rank_failure():
            if distributed.rank() == 1:
                raise ValueError("rank 1 read a bad shard")
            distributed.barrier()
        return
    if mode == "schedule":
        _schedule_worker(Path(args[0]))
        return
    root, one_process_step_1 = Path(args[0]), Path(args[1])
    import importlib.util  # with a tracker named (when installed), to see that rank 0 alone reports

    trackers = ['log.report_to=["tensorboard"]'] if importlib.util.find_spec("tensorboard") else []
    _run(root / "two", 1, None, 2, *trackers)
    _run(root / "two_per_layer", 1, None, 2, "pipeline.fit.student_gather=layer")
    _run(root / "one_to_two", num_steps=2, resume=one_process_step_1, world_size=2)
    distributed.shutdown()


if __name__ == "__main__":
    _worker(*sys.argv[1:])

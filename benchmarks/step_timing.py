"""One OPD step of benchmarks/step.py through the real runtime, timed: per plan step GPU seconds and peak memory.

run_ours writes the shape's pipeline (step_pipeline), compiles it, builds the context as `opdgraph run` does and runs
warmup + measured training steps with a plan executor that drains the device around each plan step (so stage
seconds are GPU seconds) and, on CUDA, resets the allocator's peak counter before each (so each plan step's measured
peak sits beside the plan's prediction); with --profile one more step runs under step_profile. The models are cached
across shapes and variants, and nothing of a run stays on them after it (_teardown).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

import step_profile
from step_pipeline import StepShape, write_pipeline


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_executor_class():
    from opdgraph.runtime.executor import PlanExecutor

    class SyncedExecutor(PlanExecutor):
        """The plan executor with the device drained around each plan step, so stage seconds are GPU seconds; on
        CUDA also each plan step's peak memory (the allocator's peak counter is reset before the step)."""

        synced_seconds: dict[str, float]
        step_peaks: dict[str, int]
        profiling = False  # True while one extra step runs under step_profile.StepProfile

        def _run(self, step, loop):
            device = self.ctx.device
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            started = time.perf_counter()
            if self.profiling:
                with step_profile.StepProfile.range(step.name):
                    super()._run(step, loop)
                    synchronize(device)
            else:
                super()._run(step, loop)
            synchronize(device)
            self.synced_seconds[step.name] = self.synced_seconds.get(step.name, 0.0) + time.perf_counter() - started
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
                self.step_peaks[step.name] = max(self.step_peaks.get(step.name, 0), peak)

    return SyncedExecutor


def run_ours(shape: StepShape, args, work_dir: Path, model_cache: dict, overrides: tuple[str, ...] = (),
             prepare=None) -> dict:
    """Warmup + measured steps of one shape through the runtime; per-stage seconds and (CUDA) per-plan-step peak
    memory of every step, with the plan's prediction for each plan step. prepare(ctx), when given, runs on the
    built context before the first step (a kernel variant's attention backend and compilation)."""
    from opdgraph.compile import compile_plan
    from opdgraph.config import load_pipeline
    from opdgraph.runtime import build as run_module

    pipeline = write_pipeline(work_dir, shape, tiny=args.tiny, micro_batch_tokens=args.micro_batch_tokens,
                              chunk_tokens=args.chunk_tokens, init_device="cpu" if args.cpu_init else "device")
    cfg = load_pipeline(pipeline, list(overrides))
    plan = compile_plan(cfg)
    if model_cache:  # the second shape reuses the loaded models (random init of 9B parameters takes a while)
        load = run_module.load_models
        run_module.load_models = lambda *a, **k: model_cache
    started = time.perf_counter()
    try:
        ctx = run_module.build_context(cfg, plan, work_dir / "run")
    finally:
        if model_cache:
            run_module.load_models = load
    model_cache.update({cfg.model_with_role("student"): (ctx.student, ctx.tokenizer),
                        cfg.model_with_role("teacher"): (ctx.teacher, ctx.tokenizer)})
    try:
        return _measure(ctx, cfg, plan, shape, args, prepare, started, overrides)
    finally:
        _teardown(ctx)
        del ctx  # the run's optimizer state and buffers go with it, before the next variant allocates its own
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _teardown(ctx) -> None:
    """The cached models go on to the next variant, also after a variant that failed: nothing of this run may stay
    on them (the gradient fold hooks of StudentGradients, kept gradients, the engine's KV pool). Each undoing runs
    even if one before it raises, and none hides the variant's own error."""
    def parameters_without_grads():
        for parameter in ctx.student.parameters():
            parameter.grad = None

    for undo in (ctx.engine.release, ctx.gradients.close, parameters_without_grads):
        try:
            undo()
        except Exception as error:  # noqa: BLE001
            print(f"teardown: {undo.__name__} failed: {error!r}", flush=True)


def _measure(ctx, cfg, plan, shape: StepShape, args, prepare, started: float, overrides) -> dict:
    """run_ours' warmup + measured (+ profiled) steps on a built context."""
    if prepare is not None:
        prepare(ctx)
    setup_seconds = time.perf_counter() - started
    ctx.tokenizer.eos_token_ids = []  # fixed response lengths: nothing ends a response before max_new_tokens
    hooks = {ctx.facts["grads_buffer"]: ctx.optimizer.zero_grad}  # the KV pool's: the rollout stage's own
    executor = timed_executor_class()(plan, {n: s.config for n, s in cfg.stages.items()}, ctx, release_hooks=hooks)
    steps = []
    for index in range(args.warmup + shape.steps):
        ctx.stage_seconds, ctx.step_record, executor.synced_seconds, executor.step_peaks = {}, {}, {}, {}
        synchronize(ctx.device)
        started = time.perf_counter()
        executor.run_training_step()
        synchronize(ctx.device)
        record = ctx.step_record
        steps.append({"warmup": index < args.warmup, "seconds": time.perf_counter() - started,
                      "stages": dict(executor.synced_seconds), "loss": record.get("loss"),
                      "response_tokens": record.get("response_tokens"),
                      "micro_batches": record.get("num_micro_batches"),
                      # Every byte live during the step is live during one of its plan steps.
                      "peak_gib": max(executor.step_peaks.values()) / 2**30 if executor.step_peaks else None,
                      "plan_step_peak_gib": {name: peak / 2**30 for name, peak in executor.step_peaks.items()}})
        print(f"  shape {shape.name} step {index}: {steps[-1]['seconds']:.2f} s "
              f"({'warmup' if index < args.warmup else 'measured'}), {record.get('response_tokens')} response "
              f"tokens, loss {record.get('loss')}", flush=True)
    profile = None
    if args.profile:  # one more step under torch.profiler, kernels summed per plan step (not in the figures above)
        executor.profiling = True
        with step_profile.StepProfile() as profiler:
            executor.run_training_step()
            synchronize(ctx.device)
        executor.profiling = False
        profile = profiler.summary()
        step_profile.print_summary(f"shape {shape.name}", profile)
    gpu_path = ctx.engine.gpu_path
    result = {"profile": profile, "setup_seconds": setup_seconds, "steps": steps, "overrides": list(overrides),
              "rollout_attention": "torch" if gpu_path is None else "flashinfer",
              "packed_attention": type(ctx.student.backend).__name__,
              "repeat_kv": getattr(ctx.student.backend, "repeat_kv", None),
              "layer_kernels": {"student": ctx.student.layer_kernels.name, "teacher": ctx.teacher.layer_kernels.name},
              "predicted_peak_gib": plan.peak_bytes / 2**30, "predicted_peak_step": plan.peak.step,
              "predicted_step_gib": {step.name: step.live_bytes / 2**30 for step in plan.steps}}
    if gpu_path is not None:
        result["rollout_graphs"] = {key: getattr(gpu_path.stats, key, None)
                                    for key in ("graph_steps", "eager_steps", "num_captures", "capture_seconds")}
    return result

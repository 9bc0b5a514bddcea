"""One OPD training step on a GPU, stage by stage, against its roofline floor; TRL's DistillationTrainer beside it.

Qwen2.5-1.5B student <- Qwen2.5-7B teacher (the shipped configs, random weights, bf16, vocab pair 151,936 vs
152,064), reverse KL, fixed response lengths (EOS suppressed). The run goes through the real runtime: a pipeline
file written for the shape, `compile_plan`, `build_context` and the plan executor, i.e. the code of `opdgraph run`.
The only additions are CUDA synchronisations around each plan step, so per-stage seconds are GPU seconds, and a
reset of the allocator's peak counter before each plan step, so each plan step has its measured peak memory beside
the plan's prediction.

Shapes: A = 32 sequences of 128 prompt + 256 response tokens per step; B = 128 of 256 + 1,024.

Roofline floor of a step, from the MEASURED bf16 matmul rate and device copy bandwidth (both measured here):
rollout = prefill FLOPs and, per decode round, max(FLOPs / rate, (weights + KV read) / bandwidth) (opdgraph.work);
teacher = 2N FLOPs per token + attention; student = 6N per token + 3x attention; loss = the lm_heads at response
positions (teacher 2 h V, student 2 h V forward + 4 h V backward); optimizer = bytes of AdamW on fp32 masters.
MFU of a compute stage = its FLOPs / its seconds / the measured matmul rate (and / the nominal dense bf16 peak).

    python benchmarks/step.py --out step.json            # shapes A and B, TRL on shape A (needs trl, datasets)
    python benchmarks/step.py --tiny --out /tmp/s.json   # CPU smoke run of the same code with tiny models
    python benchmarks/step.py --releases-off-compare --out releases.json   # what the lifetime analysis buys:
        # shape A as planned, with pipeline.release_phase_buffers = false (KV pool and gradients kept), and also
        # with pipeline.fuse_training = false; predicted and measured peaks side by side (same run, same models)
    python benchmarks/step.py --shapes B --no-trl --variants before,torch,liger,compile --out train_kernels.json
        # the training forward's variants (train_variants.py: layer kernels, GQA, regional compile), one step
        # each, same models: student forward + backward, teacher forward and the step against their floors

TRL's side lives in step_trl.py (optional: reported as 'skipped: reason' when it cannot run).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_profile  # noqa: E402  (benchmarks/ on the path first)

NOMINAL_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense, SXM
STAGE_GROUPS = {"rollout": ("rollout.prefill", "rollout.decode"), "teacher": ("teacher_score",),
                "student_fwd": ("loss.student_forward",), "loss": ("loss",), "backward": ("backward",),
                "optimizer": ("step",)}


@dataclass(frozen=True)
class StepShape:
    name: str
    sequences: int
    prompt_tokens: int
    response_tokens: int
    steps: int  # measured steps, after the warmup steps

    @property
    def tokens(self) -> int:
        return self.sequences * (self.prompt_tokens + self.response_tokens)


SHAPES = {"A": StepShape("A", 32, 128, 256, 3), "B": StepShape("B", 128, 256, 1024, 2)}
TINY_SHAPES = {"A": StepShape("A", 4, 16, 8, 2), "B": StepShape("B", 6, 24, 16, 2)}


# ------------------------------------------------------------------------------------------------ hardware rates
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device, repeats: int) -> float:
    function()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    synchronize(device)
    return (time.perf_counter() - started) / repeats


def measure_hardware(device: torch.device, tiny: bool) -> dict:
    """Measured dense matmul FLOP/s (model dtype) and device copy bandwidth (bytes read + written per second)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = 256 if tiny else 8192
    left, right = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    matmul_seconds = timed(lambda: left @ right, device, repeats=3 if tiny else 20)
    num_bytes = (16 if tiny else 2048) * 2**20
    source = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy_seconds = timed(lambda: target.copy_(source), device, repeats=3 if tiny else 10)
    del left, right, source, target
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    nominal = next((value for key, value in NOMINAL_BF16_TFLOPS.items() if key in name), None)
    return {"device": name, "torch": torch.__version__, "matmul_flops": 2 * size**3 / matmul_seconds,
            "copy_bytes_per_s": 2 * num_bytes / copy_seconds, "nominal_bf16_flops": nominal and nominal * 1e12}


# ---------------------------------------------------------------------------------------------- pipeline on disk
def model_configs(tiny: bool) -> tuple[dict, dict]:
    if tiny:
        from opdgraph.models.tiny_configs import tiny_config

        student, teacher = tiny_config("qwen2"), tiny_config("qwen2_untied")
        teacher.update(hidden_size=96, vocab_size=320)  # a bigger teacher with a longer vocab, as in the real pair
        return student, teacher
    from opdgraph.model_shapes import resolve_path

    def read(name):
        return json.loads(Path(resolve_path(f"pkg:opdgraph/model_configs/{name}", ".")).read_text())

    return read("qwen2.5-1.5b-instruct.json"), read("qwen2.5-7b-instruct.json")


def write_pipeline(directory: Path, shape: StepShape, *, tiny: bool, micro_batch_tokens: int,
                   chunk_tokens: int, init_device: str = "device") -> Path:
    """A pipeline file for the shape, its two model configs and a prompt file of exact-length prompts.

    Random weights are drawn on the run's device by default (models.<name>.init_device): drawing 9B parameters on
    the CPU takes minutes, and the speed of a step does not depend on the values.
    """
    student, teacher = model_configs(tiny)
    (directory / "student.json").write_text(json.dumps(student))
    (directory / "teacher.json").write_text(json.dumps(teacher))
    # The byte tokenizer's chat wraps a user message in 4 ids (bos, <|user|>, <|end|>, <|assistant|>).
    rng = random.Random(0)
    with open(directory / "prompts.jsonl", "w") as prompts:
        for _ in range(shape.sequences * (shape.steps + 3)):
            text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(shape.prompt_tokens - 4))
            prompts.write(json.dumps({"prompt": text}) + "\n")
    dtype = "float32" if tiny else "bfloat16"
    text = f"""
[pipeline]
name = "step_bench_{shape.name}"
num_steps = {shape.steps + 2}
seed = 0
memory_budget_gib = 80.0
output_dir = "{directory / 'run'}"

[models.student]
role = "student"
dtype = "{dtype}"
path = "student.json"
init_device = "{init_device}"

[models.teacher]
role = "teacher"
dtype = "{dtype}"
path = "teacher.json"
init_device = "{init_device}"

[data]
train_files = ["prompts.jsonl"]
prompts_per_step = {shape.sequences}
samples_per_prompt = 1
max_prompt_tokens = {shape.prompt_tokens}

[rollout]
max_new_tokens = {shape.response_tokens}
temperature = 1.0
max_num_seqs = {shape.sequences}
page_size = 16
prefill_token_budget = {max(2048, min(8192, shape.sequences * shape.prompt_tokens))}

[teacher_score]
micro_batch_tokens = {micro_batch_tokens}

[loss]
divergence = "reverse_kl"
chunk_tokens = {chunk_tokens}

[backward]
activation_checkpointing = false

[step]
lr = 1e-6
max_grad_norm = 1.0

[log]
progress = false
"""
    path = directory / "pipeline.toml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------ our step, timed
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


# --------------------------------------------------------------------------------------------------- roofline
def roofline(shape: StepShape, hardware: dict, *, tiny: bool, prefill_budget: int) -> dict:
    """Floor seconds and FLOPs per stage group for one step of `shape` at the measured rates."""
    from opdgraph import work
    from opdgraph.model_shapes import shape_from_hf_config

    student_config, teacher_config = model_configs(tiny)
    student, teacher = shape_from_hf_config(student_config), shape_from_hf_config(teacher_config)
    dtype_bytes = 4 if tiny else 2
    rate, bandwidth = hardware["matmul_flops"], hardware["copy_bytes_per_s"]
    hw = work.Hardware(matmul_tflops=rate / 1e12, memory_bandwidth_gbps=bandwidth / 1e9, pcie_gbps=25.0)
    length = shape.prompt_tokens + shape.response_tokens
    weight_bytes = student.parameter_count() * dtype_bytes
    kv_bytes = student.kv_bytes_per_token(dtype_bytes)
    rollout = (work.prefill_work(student, sequences=shape.sequences, prompt_tokens=shape.prompt_tokens,
                                 token_budget=prefill_budget, weight_bytes=weight_bytes, kv_bytes_per_token=kv_bytes,
                                 hardware=hw)
               + work.decode_work(student, sequences=shape.sequences, concurrent_seqs=shape.sequences,
                                  prompt_tokens=shape.prompt_tokens, new_tokens=shape.response_tokens,
                                  weight_bytes=weight_bytes, kv_bytes_per_token=kv_bytes, hardware=hw))
    positions = shape.sequences * shape.response_tokens
    flops = {"teacher": work.forward_flops(teacher, shape.tokens, length),
             "student_fwd": work.forward_flops(student, shape.tokens, length),
             "backward": 2 * work.forward_flops(student, shape.tokens, length),
             "loss": 2 * positions * student.vocab * (teacher.hidden + 3 * student.hidden)}
    floors = {name: value / rate for name, value in flops.items()}
    floors["rollout"] = rollout.seconds
    floors["optimizer"] = work.optimizer_work(student.parameter_count(), dtype_bytes, 4, hw).seconds  # fp32 sums
    flops["rollout"] = rollout.flops
    return {"floor_seconds": floors, "floor_step_seconds": sum(floors.values()), "flops": flops}


def summarize(shape: StepShape, ours: dict, floor: dict, hardware: dict) -> dict:
    measured = [step for step in ours["steps"] if not step["warmup"]] or ours["steps"]
    stage = {group: statistics.median(sum(step["stages"].get(name, 0.0) for name in names) for step in measured)
             for group, names in STAGE_GROUPS.items()}
    seconds = statistics.median(step["seconds"] for step in measured)
    mfu = {group: floor["flops"][group] / stage[group] / hardware["matmul_flops"]
           for group in ("teacher", "student_fwd", "loss", "backward") if stage[group] > 0}
    compute = [g for g in mfu]
    compute_seconds = sum(stage[g] for g in compute)
    summary = {"shape": asdict(shape), "seconds_per_step": seconds, "stage_seconds": stage,
               "tokens_per_s": shape.tokens / seconds, "response_tokens_per_s": shape.sequences
               * shape.response_tokens / seconds, "mfu_vs_measured_matmul": mfu,
               "compute_mfu_vs_measured_matmul": sum(floor["flops"][g] for g in compute) / compute_seconds
               / hardware["matmul_flops"] if compute_seconds else None,
               "floor": floor, "fraction_of_floor": floor["floor_step_seconds"] / seconds,
               "peak_gib": max((step["peak_gib"] or 0) for step in ours["steps"])}
    if hardware["nominal_bf16_flops"]:
        summary["compute_mfu_vs_nominal_peak"] = (sum(floor["flops"][g] for g in compute) / compute_seconds
                                                  / hardware["nominal_bf16_flops"]) if compute_seconds else None
    return summary


# ------------------------------------------------------------------------------------------------------- report
def print_table(report: dict) -> None:
    hardware = report["hardware"]
    print(f"\n{hardware['device']}, torch {hardware['torch']}: measured matmul "
          f"{hardware['matmul_flops'] / 1e12:.0f} TFLOP/s, copy {hardware['copy_bytes_per_s'] / 1e9:.0f} GB/s")
    columns = ("rollout", "teacher", "student_fwd", "loss", "backward", "optimizer")
    header = f"{'run':<26}{'s/step':>8}" + "".join(f"{c:>12}" for c in columns) + f"{'tok/s':>9}{'MFU':>6}"
    print(header + f"{'floor s':>9}{'floor%':>8}")
    print("-" * (len(header) + 17))
    for name, row in report["rows"].items():
        if "error" in row or "skipped" in row:
            print(f"{name:<26}  {row.get('skipped') and 'skipped: ' + row['skipped'] or 'failed: ' + row['error']}")
            continue
        stages = row.get("stage_seconds", {})
        cells = "".join(f"{stages[c]:>12.3f}" if c in stages else f"{'-':>12}" for c in columns)
        mfu = row.get("compute_mfu_vs_measured_matmul")
        floor = row.get("floor", {}).get("floor_step_seconds")
        fraction = row.get("fraction_of_floor")
        mfu_text = f"{100 * mfu:.0f}%" if mfu else "-"
        floor_text = f"{floor:.2f}" if floor else "-"
        fraction_text = f"{100 * fraction:.0f}%" if fraction else "-"
        print(f"{name:<26}{row['seconds_per_step']:>8.2f}{cells}{row['tokens_per_s']:>9.0f}{mfu_text:>6}"
              f"{floor_text:>9}{fraction_text:>8}")
    for name, row in report["rows"].items():
        if "floor" in row:
            floors = row["floor"]["floor_seconds"]
            print(f"floor {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in floors.items()))
    ours, trl = report["rows"].get("opdgraph A", {}), report["rows"].get("TRL A", {})
    if "seconds_per_step" in ours and "seconds_per_step" in trl:
        print(f"shape A: opdgraph {trl['seconds_per_step'] / ours['seconds_per_step']:.2f}x TRL's s/step "
              f"(rollout {trl['stage_seconds']['rollout'] / ours['stage_seconds']['rollout']:.2f}x, rest "
              f"{trl['other_seconds'] / (ours['seconds_per_step'] - ours['stage_seconds']['rollout']):.2f}x)")
    print("MFU = FLOPs of teacher + student forward + loss + backward / their seconds / measured matmul rate;"
          " floor% = roofline floor / measured s/step")


# What the lifetime analysis buys (--releases-off-compare): the same shape with the plan's releases between rollout
# and training switched off (KV pool kept through training, gradients kept through rollout), then also unfused.
RELEASES_OFF = "pipeline.release_phase_buffers=false"
COMPARE_VARIANTS = (("", ()), (" releases off", (RELEASES_OFF,)),
                    (" off + unfused", (RELEASES_OFF, "pipeline.fuse_training=false")))
MEMORY_STEPS = ("rollout.decode", "loss")  # the KV pool's phase and the training peak


def print_memory_table(report: dict) -> None:
    """Predicted vs measured peak per variant (measured steps only: a kept buffer exists from its first use on)."""
    print(f"\npeak memory, GiB, predicted / measured (torch.cuda.max_memory_allocated per plan step, measured steps)")
    print(f"{'run':<26}{'peak pred':>10}{'peak meas':>10}{'meas/pred':>10}"
          + "".join(f"{name + ' pred/meas':>26}" for name in MEMORY_STEPS))
    for name, row in report["rows"].items():
        raw = row.get("raw")
        if raw is None:
            print(f"{name:<26}  {row.get('error') or row.get('skipped')}")
            continue
        measured = [step["plan_step_peak_gib"] for step in raw["steps"] if not step["warmup"]] or \
            [step["plan_step_peak_gib"] for step in raw["steps"]]
        per_step = {key: max(m.get(key, 0.0) for m in measured) for key in raw["predicted_step_gib"]}
        peak = max(per_step.values(), default=0.0)
        ratio = f"{peak / raw['predicted_peak_gib']:.3f}" if peak else "-"
        cells = "".join(f"{raw['predicted_step_gib'][key]:>17.2f} / {per_step.get(key, 0.0):<6.2f}"
                        for key in MEMORY_STEPS)
        print(f"{name:<26}{raw['predicted_peak_gib']:>10.2f}{peak:>10.2f}{ratio:>10}{cells}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", help="comma-separated shapes (default A,B; A with --releases-off-compare)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--micro-batch-tokens", type=int, default=8192)
    parser.add_argument("--chunk-tokens", type=int, default=2048)
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument("--trl-steps", type=int, default=2, help="measured TRL steps after one warmup step")
    parser.add_argument("--tiny", action="store_true", help="tiny models and shapes (CPU smoke run)")
    parser.add_argument("--cpu-init", action="store_true",
                        help="draw random weights on the CPU (init_device = \"cpu\"; minutes for 9B parameters)")
    parser.add_argument("--releases-off-compare", action="store_true",
                        help="run each shape as planned, with the KV pool and gradients kept (releases off), and "
                             "also unfused; print predicted and measured peaks side by side (no TRL)")
    parser.add_argument("--steps", type=int, help="measured steps per shape (default: A 3, B 2)")
    parser.add_argument("--profile", action="store_true",
                        help="one more step per shape under torch.profiler: GPU ms per plan step by kernel kind")
    parser.add_argument("--variants", help="comma-separated training-forward variants of train_variants.py (before, "
                                           "torch, liger, compile), run one after another on the same models")
    args = parser.parse_args()
    args.shapes = args.shapes or ("A" if args.releases_off_compare else "A,B")
    if args.tiny:
        args.micro_batch_tokens, args.chunk_tokens = min(args.micro_batch_tokens, 96), min(args.chunk_tokens, 16)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = TINY_SHAPES if args.tiny else SHAPES
    report = {"hardware": measure_hardware(device, args.tiny), "rows": {}, "args": {k: str(v) for k, v in
                                                                                  vars(args).items()}}
    print(json.dumps(report["hardware"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model_cache: dict = {}
    started = time.perf_counter()
    variants = [(suffix, overrides, None) for suffix, overrides in
                (COMPARE_VARIANTS if args.releases_off_compare else COMPARE_VARIANTS[:1])]
    if args.variants:
        import train_variants

        variants = [(f" [{variant.name}]", variant.overrides(("student", "teacher")),
                     lambda ctx, variant=variant: train_variants.apply(variant, (ctx.student, ctx.teacher)))
                    for variant in train_variants.parse(args.variants)]
    for name in args.shapes.split(","):
        shape = shapes[name] if args.steps is None else replace(shapes[name], steps=args.steps)
        for suffix, overrides, prepare in variants:
            label = f"opdgraph {name}{suffix}"
            try:
                with tempfile.TemporaryDirectory() as work_dir:
                    ours = run_ours(shape, args, Path(work_dir), model_cache, overrides, prepare)
                floor = roofline(shape, report["hardware"], tiny=args.tiny,
                                 prefill_budget=max(2048, min(8192, shape.sequences * shape.prompt_tokens)))
                row = summarize(shape, ours, floor, report["hardware"])
                row["raw"] = ours
            except Exception as error:  # report and go on with the next variant
                traceback.print_exc()
                row = {"error": f"{type(error).__name__}: {error}"}
                traceback.clear_frames(error.__traceback__)  # its frames hold the failed run's context
                del error
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            report["rows"][label] = row
            args.out.write_text(json.dumps(report, indent=1, default=str))  # partial results survive a crash
            print(f"{label} done at {time.perf_counter() - started:.0f} s", flush=True)
    model_cache.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if not args.no_trl and not args.releases_off_compare and "A" in args.shapes.split(","):
        from step_trl import run_trl

        report["rows"]["TRL A"] = run_trl(shapes["A"], args, model_configs(args.tiny), device)
        print(f"TRL done at {time.perf_counter() - started:.0f} s", flush=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print_table(report)
    if args.releases_off_compare or device.type == "cuda":
        print_memory_table(report)
    if args.variants:
        import train_variants

        report["variant_summary"] = train_variants.print_summary(report)
        args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

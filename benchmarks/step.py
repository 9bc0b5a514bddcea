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

The parts, beside this script (which runs the shapes and variants and writes the report): step_pipeline.py (the
shapes and the pipeline file), step_timing.py (our step through the runtime, timed), step_floor.py (measured rates
and the roofline floor), step_report.py (summary figures and tables). TRL's side lives in step_trl.py (optional:
reported as 'skipped: reason' when it cannot run).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_floor import measure_hardware, roofline  # noqa: E402  (benchmarks/ on the path first)
from step_pipeline import SHAPES, TINY_SHAPES, model_configs  # noqa: E402
from step_report import print_memory_table, print_table, summarize  # noqa: E402
from step_timing import run_ours  # noqa: E402

# What the lifetime analysis buys (--releases-off-compare): the same shape with the plan's releases between rollout
# and training switched off (KV pool kept through training, gradients kept through rollout), then also unfused.
RELEASES_OFF = "pipeline.release_phase_buffers=false"
COMPARE_VARIANTS = (("", ()), (" releases off", (RELEASES_OFF,)),
                    (" off + unfused", (RELEASES_OFF, "pipeline.fuse_training=false")))


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

"""2 GPUs vs 1 GPU: the same training update (equivalence at fp32 and bf16 tolerances) and the step throughput.

Each variant is a real `opdgraph run` in a subprocess: one GPU (`python -m opdgraph run`, CUDA_VISIBLE_DEVICES=0)
and two GPUs (`torchrun --standalone --nproc-per-node 2 -m opdgraph run`, NCCL, NVLink multicast off). A failing
variant is reported in the table (return code and the last lines of its stderr) and the others still run.

- equivalence (tiny pipeline, fp32 and bf16): one training step from the same weights on the same global batch;
  compares the gathered step-1 checkpoint (weights and AdamW exp_avg, which is proportional to the gradient) and the
  logged loss and gradient norm. The comparison is only meaningful when both runs sampled the same responses: the
  rollout of 16 sequences on one GPU and of 8 per GPU run different batch shapes, and in bf16 a near-tie can flip a
  sampled token; the row then says "rollouts differ" instead of judging the update.
- throughput (Qwen2.5-1.5B student, 7B teacher, random weights; no eval or checkpoint tables): seconds per step
  (median after the first), trained response tokens per second, rollout tokens per second, peak GiB on rank 0.

    python benchmarks/multi_gpu.py --out multi_gpu.json            # on a machine with 2 GPUs
    python benchmarks/multi_gpu.py --skip-throughput --out eq.json  # equivalence only (a few minutes)
    python benchmarks/multi_gpu.py --only-throughput --timeout 420 --out tp.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "pipelines" / "tiny.toml"
QWEN = ROOT / "pipelines" / "qwen25_1b5_from_7b.toml"
COMMON = ["log.progress=false", "log.tensorboard=false", "pipeline.device=cuda"]
EQUIVALENCE = [*COMMON, "pipeline.num_steps=1", "step.warmup_steps=0", "step.eps=1e-6", "eval.num_prompts=2",
               "eval.max_new_tokens=4", "teacher_score.micro_batch_tokens=160", "rollout.max_new_tokens=16"]
# Random 1.5B + 7B weights drawn on the GPU: the CPU draw takes minutes, which timed the first throughput run out.
DEVICE_INIT = ['models.student.init_device="device"', 'models.teacher.init_device="device"']
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}  # relative to each tensor's largest entry


def _launch(pipeline: Path, overrides: list[str], output_dir: Path, gpus: int, timeout: int) -> dict:
    sets = [item for key in [*overrides, f"pipeline.output_dir={output_dir}"] for item in ("--set", key)]
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "OMP_NUM_THREADS": "4"}
    if gpus == 1:
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        command = [sys.executable, "-m", "opdgraph", "run", str(pipeline), *sets]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus),
                   "-m", "opdgraph", "run", str(pipeline), *sets]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        return {"returncode": done.returncode, "stderr_tail": done.stderr[-3000:]}
    except subprocess.TimeoutExpired as error:
        return {"returncode": "timeout", "stderr_tail": str(error.stderr or "")[-3000:]}


def _train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def _relative_error(expected: dict, actual: dict) -> float:
    worst = 0.0
    for name, tensor in expected.items():
        scale = max(tensor.double().abs().max().item(), 1e-12)
        worst = max(worst, (actual[name].double() - tensor.double()).abs().max().item() / scale)
    return worst


def _compare_step_one(one: Path, two: Path, dtype: str) -> dict:
    from safetensors.torch import load_file

    checkpoints = [run / "checkpoints" / "step-000001" for run in (one, two)]
    weights = [load_file(c / "student" / "model.safetensors") for c in checkpoints]
    moments = [torch.load(c / "trainer.pt", map_location="cpu", weights_only=False)["optimizer"]["exp_avg"]
               for c in checkpoints]
    records = [_train_records(run)[0] for run in (one, two)]
    row = {"weights_rel_error": _relative_error(*weights), "exp_avg_rel_error": _relative_error(*moments),
           **{f"{key}_1gpu": records[0][key] for key in ("loss", "grad_norm", "response_tokens")},
           **{f"{key}_2gpu": records[1][key] for key in ("loss", "grad_norm", "response_tokens")}}
    tolerance = TOLERANCE[dtype]
    if records[0]["response_tokens"] != records[1]["response_tokens"]:
        row["verdict"] = "rollouts differ (not comparable)"
    else:
        close = (row["weights_rel_error"] <= tolerance and row["exp_avg_rel_error"] <= tolerance
                 and abs(row["loss_2gpu"] - row["loss_1gpu"]) <= tolerance * abs(row["loss_1gpu"]))
        row["verdict"] = "equal" if close else f"DIFFERENT (tolerance {tolerance:g})"
    return row


def equivalence(dtype: str, work: Path, timeout: int) -> dict:
    overrides = [*EQUIVALENCE, f"models.student.dtype={dtype}", f"models.teacher.dtype={dtype}"]
    runs = {gpus: work / f"eq-{dtype}-{gpus}gpu" for gpus in (1, 2)}
    launches = {gpus: _launch(TINY, overrides, run_dir, gpus, timeout) for gpus, run_dir in runs.items()}
    failed = {gpus: result for gpus, result in launches.items() if result["returncode"] != 0}
    if failed:
        return {"variant": f"equivalence {dtype}", "verdict": "FAILED", "failures": failed}
    return {"variant": f"equivalence {dtype}", **_compare_step_one(runs[1], runs[2], dtype)}


def _throughput_pipeline() -> Path:
    """The Qwen pipeline without its eval and checkpoint tables (a 1.5B checkpoint with fp32 optimizer state is
    18 GB of disk writes), written beside the original so its relative data paths still resolve."""
    kept, skipping = [], False
    for line in QWEN.read_text().splitlines():
        if line.startswith("["):
            skipping = line.strip() in ("[eval]", "[checkpoint]")
        if not skipping:
            kept.append(line)
    path = QWEN.parent / f".multi_gpu_{os.getpid()}.toml"
    path.write_text("\n".join(kept) + "\n")
    return path


def throughput(gpus: int, work: Path, steps: int, new_tokens: int, timeout: int) -> dict:
    pipeline = _throughput_pipeline()
    run_dir = work / f"throughput-{gpus}gpu"
    try:
        launch = _launch(pipeline, [*COMMON, *DEVICE_INIT, f"pipeline.num_steps={steps}",
                                    f"rollout.max_new_tokens={new_tokens}"],
                         run_dir, gpus, timeout)
    finally:
        pipeline.unlink()
    if launch["returncode"] != 0:
        return {"variant": f"throughput {gpus} GPU", "verdict": "FAILED", "failures": {gpus: launch}}
    records = _train_records(run_dir)[1:] or _train_records(run_dir)
    seconds = statistics.median(r["seconds"] for r in records)
    tokens = statistics.median(r["response_tokens"] for r in records)
    return {"variant": f"throughput {gpus} GPU", "verdict": "ok", "steps_timed": len(records),
            "seconds_per_step": seconds, "response_tokens_per_step": tokens,
            "trained_tokens_per_s": tokens / seconds,
            "rollout_tokens_per_s": statistics.median(r["rollout_tokens_per_s"] for r in records),
            "peak_memory_gib_rank0": max(r.get("peak_memory_gib", 0.0) for r in records)}


def _print_table(rows: list[dict], card: str) -> None:
    print(f"\nmulti-GPU results on {card}")
    for row in rows:
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()
                 if k not in ("variant", "failures")}
        print(f"  {row['variant']:<22} " + "  ".join(f"{k}={v}" for k, v in shown.items()))
        for gpus, failure in row.get("failures", {}).items():
            print(f"    {gpus} GPU run failed ({failure['returncode']}):\n      "
                  + failure["stderr_tail"][-1200:].replace("\n", "\n      "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--skip-throughput", action="store_true", help="equivalence runs only")
    parser.add_argument("--only-throughput", action="store_true", help="throughput runs only")
    parser.add_argument("--steps", type=int, default=4, help="throughput: training steps (the first is not timed)")
    parser.add_argument("--new-tokens", type=int, default=256, help="throughput: rollout.max_new_tokens")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per run")
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        sys.exit(f"needs 2 CUDA GPUs, found {torch.cuda.device_count()}")
    card = torch.cuda.get_device_name(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="multi_gpu_") as tmp:
        work = Path(tmp)
        for dtype in () if args.only_throughput else ("float32", "bfloat16"):
            rows.append(equivalence(dtype, work, args.timeout))
        if not args.skip_throughput:
            for gpus in (1, 2):
                rows.append(throughput(gpus, work, args.steps, args.new_tokens, args.timeout))
    singles = [r for r in rows if r["variant"].startswith("throughput") and r["verdict"] == "ok"]
    if len(singles) == 2:
        rows.append({"variant": "speedup 2 vs 1 GPU", "verdict": "ok",
                     "trained_tokens_per_s": singles[1]["trained_tokens_per_s"] / singles[0]["trained_tokens_per_s"]})
    _print_table(rows, card)
    if args.out:
        Path(args.out).write_text(json.dumps({"card": card, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""2 GPUs vs 1 GPU: the same training update (equivalence at fp32 and bf16 tolerances) and the step throughput.

Each variant is a real `opdgraph run` in a subprocess, through benchmarks/rank_worker.py (which prints each rank's
phases and records its peak memory): one GPU (CUDA_VISIBLE_DEVICES=0) and two GPUs (`torchrun --standalone
--nproc-per-node 2`, NCCL, NVLink multicast off). The child's output streams here line by line, prefixed with the
variant. Every launch has its own timeout, cut so that the whole script ends within --time-budget seconds (the
process group of a run that is out of time is killed, torchrun's workers included); a failing or skipped variant is
reported in the table and the others still run. The JSON (--out) is rewritten after every variant.

- throughput (first; shape B of benchmarks/step.py: 128 prompts of 256 tokens, 1,024 response tokens each, Qwen2.5
  1.5B student <- 7B teacher, random weights drawn on the GPU, EOS ignored so both runs decode the same tokens):
  1 warmup + 2 measured steps on 1 GPU, then the --throughput variants on 2 GPUs: the plan as configured (64
  sequences per rank, the student gathered once per step), the student gathered per layer (FSDP's default), a
  sharded teacher, and the same batch per GPU (128 sequences per rank). Reported: seconds per step (median of the
  measured steps) and rank 0's seconds per plan step, response and total tokens per second, scaling = tokens/s on 2
  GPUs / tokens/s on 1 GPU (target >= 1.8), and every rank's peak memory (torch.cuda.max_memory_allocated over the
  run's steps) against the plan's per-rank predicted peak.
- equivalence (tiny pipeline, fp32 and bf16): one training step from the same weights on the same global batch;
  compares the gathered step-1 checkpoint (weights and AdamW exp_avg, which is proportional to the gradient) and the
  logged loss and gradient norm. The comparison is only meaningful when both runs sampled the same responses: the
  rollout of 16 sequences on one GPU and of 8 per GPU run different batch shapes, and in bf16 a near-tie can flip a
  sampled token; the row then says "rollouts differ" instead of judging the update.

    python benchmarks/multi_gpu.py --out multi_gpu.json            # on a machine with 2 GPUs (under 9 minutes)
    python benchmarks/multi_gpu.py --only-throughput --throughput 1,2,2:shard --out tp.json
    python benchmarks/multi_gpu.py --skip-throughput --out eq.json  # equivalence only (a few minutes)
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "pipelines" / "tiny.toml"
WORKER = Path(__file__).resolve().parent / "rank_worker.py"
COMMON = ["log.progress=false", "pipeline.device=cuda"]
EQUIVALENCE = [*COMMON, "pipeline.num_steps=1", "step.warmup_steps=0", "eval.num_prompts=2",
               "eval.max_new_tokens=4", "teacher_score.micro_batch_tokens=160", "rollout.max_new_tokens=16"]
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}  # relative to each tensor's largest entry
# AdamW's first update is lr * g / (|g| + eps): with a tiny eps it is lr * sign(g), a step function of the gradient,
# so a bf16-sized difference in a near-zero gradient entry flips that entry's update by 2 lr (measured: 3.2% of the
# largest weight, with exp_avg, i.e. the gradient, equal to 0.95%). In bf16 the comparison therefore uses an eps
# above the gradients' scale, where the update is a smooth function of the gradient and equal gradients must give
# equal weights. fp32 keeps eps 1e-6 (its gradients agree far below any entry's size).
EPS = {"float32": "1e-6", "bfloat16": "1e-2"}
GIB = 2**30

# A forced decision makes the fit search run, and it may then also change sizes the roofline cannot tell apart:
# the variants pin them to shape B's, so that only the named choice differs.
PINNED = ["pipeline.fit.micro_batch_tokens=[8192]", "pipeline.fit.chunk_tokens=[2048]", "pipeline.fit.max_num_seqs=[128]"]
VARIANTS = {  # --throughput tags: a 2-GPU run with one plan choice changed, or a twice larger global batch
    "": ("", []),
    "layer": (" (student gathered per layer)", ["pipeline.fit.student_gather=layer", *PINNED]),
    "shard": (" (sharded teacher)", ["pipeline.fit.teacher_weights=shard", *PINNED]),
    "weak": (" (same batch per GPU)", []),
}


class Deadline:
    """The script's whole time budget: each launch gets at most what is left, minus a margin for the report."""

    def __init__(self, seconds: float, margin: float = 15.0):
        self.ends = time.monotonic() + seconds - margin

    def left(self) -> float:
        return self.ends - time.monotonic()


def progress(text: str) -> None:
    print(text, flush=True)


def _stream(pipe, label: str, tail: collections.deque) -> None:
    for line in pipe:
        tail.append(line)
        print(f"    [{label}] {line}", end="", flush=True)


def _kill_group(child: subprocess.Popen) -> None:
    """SIGTERM to the launch's process group, then SIGKILL to whatever is left of it (a rank stuck in NCCL)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _launch(label: str, pipeline: Path, overrides: list[str], output_dir: Path, gpus: int, timeout: float,
            fixed_lengths: bool = False) -> dict:
    """One `opdgraph run` (1 GPU, or torchrun on `gpus`), output streamed; killed with its children at `timeout`."""
    sets = [item for key in [*overrides, f"pipeline.output_dir={output_dir}"] for item in ("--set", key)]
    report_dir = output_dir.parent / f"{output_dir.name}-ranks"
    worker = [str(WORKER), str(report_dir), *(["--fixed-lengths"] if fixed_lengths else []), "run", str(pipeline),
              *sets]
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "OMP_NUM_THREADS": "4", "PYTHONUNBUFFERED": "1"}
    if gpus == 1:
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        command = [sys.executable, *worker]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus),
                   *worker]
    progress(f"  [{label}] launching ({gpus} GPU, timeout {timeout:.0f} s)")
    started = time.monotonic()
    # A session of its own: on timeout the whole group (torchrun and its workers) is killed, not torchrun alone.
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                             start_new_session=True)
    tail: collections.deque = collections.deque(maxlen=40)
    reader = threading.Thread(target=_stream, args=(child.stdout, label, tail), daemon=True)
    reader.start()
    try:
        returncode = child.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        returncode = "timeout"
        _kill_group(child)
    reader.join(timeout=5)
    seconds = time.monotonic() - started
    progress(f"  [{label}] ended after {seconds:.0f} s: {'ok' if returncode == 0 else returncode}")
    ranks = [json.loads(path.read_text()) for path in sorted(report_dir.glob("rank*.json"))]
    return {"returncode": returncode, "seconds": seconds, "output_tail": "".join(tail)[-3000:], "ranks": ranks}


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


def _failed(variant: str, launches: dict) -> dict:
    failures = {gpus: {key: launch[key] for key in ("returncode", "seconds", "output_tail")}
                for gpus, launch in launches.items() if launch["returncode"] != 0}
    return {"variant": variant, "verdict": "FAILED", "failures": failures}


def equivalence(spec: str, work: Path, deadline: Deadline, timeout: float) -> dict:
    """spec "DTYPE" or "DTYPE:TAG": with TAG "layer" or "shard" the 2-GPU run gathers the student per layer or
    shards the teacher (the 1-GPU reference is the same), so that plan choice is checked for the same update too."""
    dtype, _, tag = spec.partition(":")
    overrides = [*EQUIVALENCE, f"models.student.dtype={dtype}", f"models.teacher.dtype={dtype}",
                 f"step.eps={EPS[dtype]}"]
    variant = f"equivalence {dtype}{VARIANTS[tag][0]}"
    runs = {gpus: work / f"eq-{dtype}-{tag or 'plain'}-{gpus}gpu" for gpus in (1, 2)}
    launches = {}
    for gpus, run_dir in runs.items():
        extra = [VARIANTS[tag][1][0]] if tag and gpus == 2 else []  # the decision alone, not shape B's pinned sizes
        launches[gpus] = _launch(f"{variant} {gpus} GPU", TINY, [*overrides, *extra], run_dir, gpus,
                                 min(timeout, deadline.left()))
        if launches[gpus]["returncode"] != 0:
            return _failed(variant, launches)
    return {"variant": variant, **_compare_step_one(runs[1], runs[2], dtype)}


def _shape_b_pipeline(work: Path, steps: int) -> Path:
    """Shape B of benchmarks/step.py as a pipeline file: real Qwen2.5 configs, random weights drawn on the GPU."""
    from step_pipeline import SHAPES, write_pipeline

    shape = dataclasses.replace(SHAPES["B"], steps=steps)  # steps sizes the prompt file
    directory = work / "shape-b"
    directory.mkdir()
    return write_pipeline(directory, shape, tiny=False, micro_batch_tokens=8192, chunk_tokens=2048,
                          init_device="device")


def throughput(spec: str, pipeline: Path, work: Path, warmup: int, measured: int, deadline: Deadline,
               timeout: float) -> dict:
    """Shape B on `gpus` GPUs (spec "GPUS" or "GPUS:TAG", TAG one of VARIANTS): the same global batch (strong
    scaling), or with "weak" the same batch per GPU (data.prompts_per_step x gpus)."""
    from step_pipeline import SHAPES

    gpus_text, _, tag = spec.partition(":")
    gpus = int(gpus_text)
    suffix, extra = VARIANTS[tag]
    variant = f"throughput {gpus} GPU{suffix}"
    run_dir = work / f"throughput-{gpus}gpu-{tag or 'plain'}"
    overrides = [*COMMON, f"pipeline.num_steps={warmup + measured}", *extra]
    if tag == "weak":
        overrides.append(f"data.prompts_per_step={SHAPES['B'].sequences * gpus}")
    launch = _launch(variant, pipeline, overrides, run_dir, gpus, min(timeout, deadline.left()), fixed_lengths=True)
    if launch["returncode"] != 0:
        row = _failed(variant, {gpus: launch})
        row["ranks_reached"] = {r["rank"]: r["phases"][-1] for r in launch["ranks"] if r["phases"]}
        return row
    records = _train_records(run_dir)[warmup:] or _train_records(run_dir)
    seconds = statistics.median(r["seconds"] for r in records)
    response_tokens = statistics.median(r["response_tokens"] for r in records)
    sequences = statistics.median(r["response_tokens"] / r["response_length_mean"] for r in records)
    prompt_tokens = SHAPES["B"].prompt_tokens  # write_pipeline makes every prompt exactly this long
    stages = sorted({key for r in records for key in r if key.startswith("seconds/")})
    row = {"variant": variant, "verdict": "ok", "gpus": gpus, "tag": tag, "steps_timed": len(records),
           "seconds_per_step": seconds, "response_tokens_per_step": response_tokens,
           "response_tokens_per_s": response_tokens / seconds,
           "tokens_per_s": (response_tokens + sequences * prompt_tokens) / seconds,
           "rollout_tokens_per_s": statistics.median(r["rollout_tokens_per_s"] for r in records),
           # rank 0's host seconds per plan step (the step's one read-back makes the optimizer absorb queued work)
           "stage_seconds": {key.removeprefix("seconds/"): statistics.median(r.get(key, 0.0) for r in records)
                             for key in stages},
           "launch_seconds": launch["seconds"]}
    for rank in launch["ranks"]:
        peak = max((step["peak_bytes"] for step in rank["steps"]), default=0)
        predicted = rank.get("predicted_peak_bytes")
        row[f"rank{rank['rank']}_peak_gib"] = peak / GIB
        row[f"rank{rank['rank']}_predicted_gib"] = predicted / GIB if predicted else None
        row[f"rank{rank['rank']}_measured_over_predicted"] = peak / predicted if predicted and peak else None
    return row


def _print_table(rows: list[dict], card: str) -> None:
    print(f"\nmulti-GPU results on {card}")
    for row in rows:
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()
                 if k not in ("variant", "failures")}
        print(f"  {row['variant']:<22} " + "  ".join(f"{k}={v}" for k, v in shown.items()))
        for gpus, failure in row.get("failures", {}).items():
            print(f"    {gpus} GPU run failed ({failure['returncode']} after {failure['seconds']:.0f} s):\n      "
                  + failure["output_tail"][-1500:].replace("\n", "\n      "))
    runs = [row for row in rows if row.get("verdict") == "ok" and "gpus" in row]
    one = next((row for row in runs if row["gpus"] == 1), None)
    if not runs:
        return
    print(f"\n  shape B{'':<44} {'s/step':>7} {'tok/s':>7} {'scaling':>8}   per-rank peak GiB (measured / plan)")
    for row in runs:
        peaks = "  ".join(f"r{r}: {row[f'rank{r}_peak_gib']:.2f} / {row[f'rank{r}_predicted_gib'] or 0:.2f}"
                          for r in range(row["gpus"]) if f"rank{r}_peak_gib" in row)
        scaling = f"{row['tokens_per_s'] / one['tokens_per_s']:.2f}x" if one else "-"
        print(f"  {row['variant']:<51} {row['seconds_per_step']:>7.2f} {row['tokens_per_s']:>7.0f} {scaling:>8}   "
              f"{peaks}")
        print("      " + "  ".join(f"{name} {value:.2f}" for name, value in row["stage_seconds"].items()))
    print("  scaling = tokens/s over the 1-GPU run's; target >= 1.8x on 2 GPUs. Same global batch (strong scaling) "
          "unless the row says same batch per GPU (weak scaling).")


def _write(path: str | None, card: str, rows: list[dict]) -> None:
    if path:
        Path(path).write_text(json.dumps({"card": card, "torch": torch.__version__, "rows": rows}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here (rewritten after every variant)")
    parser.add_argument("--skip-throughput", action="store_true", help="equivalence runs only")
    parser.add_argument("--only-throughput", action="store_true", help="throughput runs only")
    parser.add_argument("--throughput", default="1,2,2:layer,2:weak",
                        help="throughput runs, in order: GPU counts, each optionally with a tag: 'layer' (student "
                             "gathered per layer), 'shard' (sharded teacher), 'weak' (same batch per GPU, twice the "
                             "global batch)")
    parser.add_argument("--dtypes", default="float32,bfloat16,bfloat16:shard",
                        help="equivalence runs: dtypes, each optionally with a tag of the 2-GPU run: 'layer' "
                             "(student gathered per layer) or 'shard' (sharded teacher)")
    parser.add_argument("--warmup", type=int, default=1, help="throughput: untimed training steps")
    parser.add_argument("--steps", type=int, default=2, help="throughput: measured training steps")
    parser.add_argument("--timeout", type=float, default=200, help="most seconds for one launch")
    parser.add_argument("--time-budget", type=float, default=540,
                        help="most seconds for the whole script; launches are cut or skipped to end within it")
    args = parser.parse_args()
    deadline = Deadline(args.time_budget)
    if torch.cuda.device_count() < 2:
        sys.exit(f"needs 2 CUDA GPUs, found {torch.cuda.device_count()}")
    card = torch.cuda.get_device_name(0)
    progress(f"{torch.cuda.device_count()} x {card}, torch {torch.__version__}; budget {args.time_budget:.0f} s")
    jobs = []
    with tempfile.TemporaryDirectory(prefix="multi_gpu_") as tmp:
        work = Path(tmp)
        if not args.skip_throughput:
            pipeline = _shape_b_pipeline(work, 2 * (args.warmup + args.steps))  # prompts for 2 GPUs' batches
            jobs += [(f"throughput {spec}", lambda spec=spec: throughput(
                spec, pipeline, work, args.warmup, args.steps, deadline, args.timeout))
                for spec in args.throughput.split(",")]
        if not args.only_throughput:
            jobs += [(f"equivalence {spec}", lambda spec=spec: equivalence(spec, work, deadline, args.timeout))
                     for spec in args.dtypes.split(",")]
        rows = []
        for variant, job in jobs:
            if deadline.left() < 60:
                rows.append({"variant": variant, "verdict": "skipped (time budget)"})
                progress(f"[{variant}] skipped: {deadline.left():.0f} s of the time budget left")
            else:
                progress(f"[{variant}] starting ({deadline.left():.0f} s of the time budget left)")
                try:
                    rows.append(job())
                except Exception as error:  # a broken comparison must not lose the other rows
                    rows.append({"variant": variant, "verdict": f"FAILED: {type(error).__name__}: {error}"})
            progress(f"[{variant}] {rows[-1]['verdict']}")
            _write(args.out, card, rows)
    _print_table(rows, card)
    _write(args.out, card, rows)


if __name__ == "__main__":
    main()

"""Decode-burst variants side by side on one GPU (issue 19's rollout levers), against the bandwidth roofline.

Qwen2.5-1.5B shapes with random bf16 weights (gate/up packed back to back once, DecoderLM.pack_gate_up, so every
variant runs the same parameters), 256 prompt + 1024 new tokens, temperature 1, EOS never stops a row; batch
64 / 128 / 256. Every variant is timed end to end through the engine at every batch size, in one run, the variants
of a batch size back to back. Switches (each from an engine option; baseline = the engine before issue 19):
- gate/up: one [2 I, H] matmul over the packed parameters instead of two (RolloutEngine.stacked_gate_up);
- state: the burst step's bookkeeping as two Triton kernels instead of ~20 torch ops (DecodeBurst.fused_state);
- attn: decode-attention launch settings, "tuned" = the fastest per batch size in the kernel sweep that runs first
  (benchmarks/decode_attention_sweep.py), "all-heads" / "head-major" = those layouts at the default splits;
- bursts: decode_burst_steps (fewer host round trips);
- cublaslt: torch.backends.cuda.preferred_blas_library("cublaslt") for the projections.

Columns: ms/step = wall time between burst ends per decode step (what a rollout sees); dev ms = device time of the
bursts (CUDA events from the state copy to the last step); gap = the host's share of the wall time (scheduling,
staging and the token round trip between bursts, when the GPU waits); roof% = roofline time (weights + K/V of every
cached token read once per step at the measured copy bandwidth) over ms/step, dev% the same over dev ms.
--profile adds kernel time per step by category and the GPU-idle fraction, for the baseline and for the fastest
variant at batch 128, at batch 128 with a 768-token prompt (the mean context of the 1024-token run).

    cd benchmarks && python decode_variants.py --profile --out decode_variants.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode_attention_sweep  # noqa: E402
from rollout_gpu import CONFIG, attention_settings, copy_bandwidth, make_requests, run_variant  # noqa: E402
from rollout_profile import profile_decode  # noqa: E402

from opdgraph.kernels.paged_decode_attention import LaunchSettings  # noqa: E402
from opdgraph.models import load_decoder  # noqa: E402
from opdgraph.rollout import RolloutEngine  # noqa: E402

TARGETS = {64: 0.55, 128: 0.65, 256: 0.65}  # issue 19: fraction of the roofline per batch size
ATTENTION = {"default": None, "all-heads": LaunchSettings(kv_heads_per_program=0),
             "head-major": LaunchSettings(head_major=True)}
CATEGORIES = [("attention", ("split_kernel",)), ("attention merge", ("merge_kernel",)),
              ("gemm", ("nvjet", "gemm", "cutlass", "xmma", "splitkreduce", "sm90_")),
              ("norm", ("add_rms_norm",)), ("rope + kv store", ("rope_store_kv",)),
              ("activation", ("gated_activation",)), ("sampler", ("race_",)), ("burst state", ("slots_kernel",
                                                                                             "advance_kernel"))]


@dataclass(frozen=True)
class Variant:
    name: str
    gate_up: bool = False
    state: bool = False
    attention: str = "default"
    burst: int = 16
    blas: str | None = None


ALL = dict(gate_up=True, state=True, attention="tuned")
VARIANTS = [Variant("baseline"), Variant("gate/up", gate_up=True), Variant("state", state=True),
            Variant("attn tuned", attention="tuned"), Variant("all", **ALL),
            Variant("all + bursts32", **ALL, burst=32), Variant("all + bursts64", **ALL, burst=64),
            Variant("all + cublaslt", **ALL, blas="cublaslt")]
EXTRA = [Variant("attn all-heads", attention="all-heads"), Variant("attn head-major", attention="head-major")]


@contextlib.contextmanager
def variant_settings(variant: Variant, tuned: dict):
    """The process-wide parts of a variant: attention launch settings and the BLAS library."""
    by_batch = tuned if variant.attention == "tuned" else None
    saved_blas = torch.backends.cuda.preferred_blas_library()
    if variant.blas:
        torch.backends.cuda.preferred_blas_library(variant.blas)
    try:
        with attention_settings(ATTENTION.get(variant.attention), by_batch):
            yield
    finally:
        torch.backends.cuda.preferred_blas_library(saved_blas)


def run(model, args, bandwidth, weight_bytes, variant: Variant, batch_size: int, tuned: dict) -> dict:
    with variant_settings(variant, tuned):
        row = run_variant(model, args, bandwidth, weight_bytes, name=variant.name, attention="flashinfer",
                          cuda_graphs=True, batch_size=batch_size, new_tokens=args.new_tokens,
                          decode_burst_steps=variant.burst, fused_kernels=True, stacked_gate_up=variant.gate_up,
                          fused_state=variant.state)
    row["variant"] = asdict(variant)
    return row


def profile(model, args, variant: Variant, tuned: dict, batch_size: int = 128) -> dict:
    """Kernel ms per decode step by category and GPU idle, 2 bursts at the run's mean context (rollout_profile)."""
    prompt_tokens = args.prompt_tokens + args.new_tokens // 2
    new_tokens = 6 * variant.burst

    def make_engine():
        pages = batch_size * -(-(prompt_tokens + new_tokens) // args.page_size)
        engine = RolloutEngine(model, page_size=args.page_size, num_pages=pages, max_num_seqs=batch_size,
                               prefill_token_budget=args.prefill_budget, device="cuda", attention="flashinfer",
                               cuda_graphs=True, decode_burst_steps=variant.burst, fused_kernels=True,
                               stacked_gate_up=variant.gate_up)
        engine.burst.fused_state = variant.state
        return engine

    requests = make_requests(batch_size, prompt_tokens, new_tokens, model.config.vocab_size, greedy=False)
    prefill_steps = -(-batch_size * prompt_tokens // args.prefill_budget)
    with variant_settings(variant, tuned):
        result = profile_decode(make_engine, requests, warm_steps=prefill_steps + 2, profiled_steps=2, top=400,
                                device_steps_per_step=variant.burst)
    steps = result["profiled_steps"]
    categories = {name: 0.0 for name, _ in CATEGORIES} | {"other": 0.0}
    for kernel in result.pop("top_kernels"):
        lowered = kernel["name"].lower()
        category = next((name for name, keys in CATEGORIES if any(key in lowered for key in keys)), "other")
        categories[category] += kernel["total_ms"] / steps
    return dict(variant=variant.name, batch_size=batch_size, context=prompt_tokens, wall_ms_per_step=result[
        "wall_ms_per_step"], gpu_idle_fraction=result["gpu_idle_fraction"], kernel_ms_per_step=categories)


def print_tables(rows, batch_sizes, profiles):
    header = (f"{'variant':<22} {'bs':>4} {'ms/step':>8} {'dev ms':>7} {'gap':>6} {'roof ms':>8} {'roof%':>6} "
              f"{'dev%':>6} {'vs base':>7} {'gate/up L':>9} {'capture s':>9} {'free GiB':>8}")
    print(header + "\n" + "-" * len(header))
    base = {row["batch_size"]: row for row in rows if row.get("name") == "baseline" and "error" not in row}
    for row in rows:
        if "error" in row:
            print(f"{row['name']:<22} {row['batch_size']:>4} ERROR {row['error'].strip().splitlines()[-1]}")
            continue
        speedup = base[row["batch_size"]]["ms_per_decode_step"] / row["ms_per_decode_step"] \
            if row["batch_size"] in base else float("nan")
        print(f"{row['name']:<22} {row['batch_size']:>4} {row['ms_per_decode_step']:>8.3f} "
              f"{row['device_ms_per_decode_step']:>7.3f} {100 * row['host_gap_fraction']:>5.1f}% "
              f"{row['roofline_ms_per_step']:>8.3f} {100 * row['fraction_of_roofline']:>5.1f}% "
              f"{100 * row['fraction_of_roofline_device']:>5.1f}% {speedup:>6.3f}x "
              f"{row['stacked_gate_up_layers']:>9} {row['capture_seconds']:>9.2f} {row['free_gib_during']:>8.1f}")
    names = list(dict.fromkeys(row["name"] for row in rows))
    targets = ", ".join(f"bs{batch} {100 * target:.0f}%" for batch, target in TARGETS.items())
    print(f"\nroofline % (wall) by batch size; targets {targets}")
    print(f"{'variant':<22}" + "".join(f"{'bs' + str(b):>9}" for b in batch_sizes))
    for name in names:
        cells = []
        for batch in batch_sizes:
            row = next((r for r in rows if r["name"] == name and r["batch_size"] == batch and "error" not in r), None)
            mark = "" if row is None or row["fraction_of_roofline"] < TARGETS.get(batch, 1) else "*"
            cells.append(f"{'-' if row is None else format(100 * row['fraction_of_roofline'], '.1f') + mark:>9}")
        print(f"{name:<22}" + "".join(cells))
    print("(* meets the issue's target)")
    for result in profiles:
        if "error" in result:
            print(f"\nprofile {result['variant']}: ERROR {result['error'].strip().splitlines()[-1]}")
            continue
        idle = "-" if result["gpu_idle_fraction"] is None else f"{100 * result['gpu_idle_fraction']:.1f}%"
        print(f"\nprofile {result['variant']}: bs{result['batch_size']}, context {result['context']}, "
              f"{result['wall_ms_per_step']:.3f} ms/step wall, GPU idle {idle}")
        for name, ms in result["kernel_ms_per_step"].items():
            print(f"  {name:<18} {ms:7.3f} ms/step")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("decode_variants.json"))
    parser.add_argument("--batch-sizes", default="64,128,256")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--prefill-budget", type=int, default=8192)
    parser.add_argument("--variants", default="", help="comma list of variant names (default: all but the extras)")
    parser.add_argument("--extra", action="store_true", help="also the extra attention layouts at default splits")
    parser.add_argument("--no-sweep", action="store_true", help="skip the kernel sweep ('attn tuned' = default)")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    variants = VARIANTS + (EXTRA if args.extra else [])
    if args.variants:
        wanted = args.variants.split(",")
        variants = [variant for variant in variants if variant.name in wanted]

    model = load_decoder(json.loads(CONFIG.read_text()), dtype=torch.bfloat16, device="cuda", init_seed=0,
                         init_device="device")
    model.pack_gate_up()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(torch.device("cuda"))
    header = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, copy_bandwidth_gb_s=bandwidth / 1e9,
                  weight_bytes=weight_bytes, kv_bytes_per_token_bf16=model.kv_bytes_per_token(),
                  prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)
    print(json.dumps(header, indent=1), flush=True)
    result = dict(header=header, sweep=[], tuned={}, rows=[], profiles=[])

    def save():
        args.out.write_text(json.dumps(result, indent=1, default=str))

    tuned = {}
    if not args.no_sweep and any(v.attention == "tuned" for v in variants):
        started = time.perf_counter()
        mean_context = args.prompt_tokens + args.new_tokens // 2
        contexts = [mean_context - args.new_tokens // 4, mean_context + args.new_tokens // 4]
        print(f"decode-attention sweep at contexts {contexts} (us and % of copy bandwidth per context)", flush=True)
        result["sweep"], tuned = decode_attention_sweep.sweep(batch_sizes, contexts, bandwidth,
                                                              log=lambda line: print(line, flush=True))
        result["tuned"] = {batch: asdict(settings) for batch, settings in tuned.items()}
        result["tuned_literal"] = decode_attention_sweep.table_literal(tuned)
        print(f"sweep took {time.perf_counter() - started:.0f} s; tuned:\n{result['tuned_literal']}", flush=True)
        save()
    for batch_size in batch_sizes:
        for variant in variants:
            started = time.perf_counter()
            try:
                row = run(model, args, bandwidth, weight_bytes, variant, batch_size, tuned)
            except Exception:  # noqa: BLE001 -- one failing variant must not hide the others' numbers
                row = dict(name=variant.name, batch_size=batch_size, error=traceback.format_exc())
                print(row["error"], flush=True)
            row["seconds_to_run"] = time.perf_counter() - started
            result["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "host_ms_per_step"}), flush=True)
            save()
    if args.profile:
        timed = [row for row in result["rows"] if row["batch_size"] == 128 and "error" not in row]
        fastest = min(timed, key=lambda row: row["ms_per_decode_step"])["variant"] if timed else None
        chosen = [VARIANTS[0]] + ([Variant(**fastest)] if fastest else [])
        for variant in dict.fromkeys(chosen):
            try:
                result["profiles"].append(profile(model, args, variant, tuned))
            except Exception:  # noqa: BLE001 -- the profile must not hide the table
                result["profiles"].append(dict(variant=variant.name, error=traceback.format_exc()))
                print(result["profiles"][-1]["error"], flush=True)
            save()
    print()
    print(f"{header['device']}: copy bandwidth {bandwidth / 1e9:.0f} GB/s, weights {weight_bytes / 1e9:.2f} GB, "
          f"KV {header['kv_bytes_per_token_bf16']} B/token, {args.prompt_tokens} + {args.new_tokens} tokens")
    print_tables(result["rows"], batch_sizes, result["profiles"])
    if tuned:
        print(f"\ntuned decode-attention settings (kernel sweep):\n{result['tuned_literal']}")
    save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""MasterAdamW.step alone: the foreach path against the fused Triton path, against the copy-bandwidth roofline.

Parameter shapes of Qwen2.5-1.5B (the shipped config, built on the meta device: 338 tensors, 1.54B elements), bf16
parameters with fp32 masters and moments, fp32 gradients (the accumulators the runtime passes as ``grads``,
opdgraph.runtime.gradients). Both variants run in the same process, one after the other, on the same gradients.

Bytes a step must move, per element with a separate master (g = gradient bytes, p = parameter bytes):
check pass reads master, grad, both moments (12 + g); the update reads them again and writes master, both moments
and the parameter (24 + g + p): 46 bytes with fp32 grads and bf16 parameters. Roofline = those bytes / the copy
bandwidth measured in the same run (read + write bytes of one large device copy per second).

    python benchmarks/optimizer_bench.py --out benchmarks/results/optimizer_h200.json    # CUDA: both paths
    python benchmarks/optimizer_bench.py --tiny --out /tmp/optimizer.json    # CPU smoke run: the tiny qwen2 shapes;
        # foreach only, plus the fused path under TRITON_INTERPRET=1 when that is set

Prints one row per variant (ms per step, GB moved, fraction of the roofline) and writes --out JSON and a .txt table
next to it. The last 4096 master values of the first three tensors are compared across variants (largest difference
over the largest value: ~1e-7 is fp32 rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from importlib import resources
from pathlib import Path

import torch

from opdgraph.models.config import decoder_config_from_hf
from opdgraph.models.decoder import DecoderLM
from opdgraph.models.tiny_configs import tiny_config
from opdgraph.train.optimizer import MasterAdamW

MODEL = "qwen2.5-1.5b-instruct"


def parameter_shapes(tiny: bool) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of the model, from a model built on the meta device (no memory)."""
    if tiny:
        hf_config = tiny_config("qwen2")
    else:
        hf_config = json.loads(resources.files("opdgraph").joinpath(f"model_configs/{MODEL}.json").read_text())
    with torch.device("meta"):
        model = DecoderLM(decoder_config_from_hf(hf_config, MODEL))
    return {name: tuple(param.shape) for name, param in model.named_parameters()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, num_bytes: int) -> float:
    """Bytes per second read plus written by one device copy of `num_bytes` (median of 10 after 2 warm-ups)."""
    source = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = median_seconds(lambda: target.copy_(source), device, warmup=2, repeats=10)
    return 2 * num_bytes / seconds


def median_seconds(function, device: torch.device, *, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000)
        else:
            began = time.perf_counter()
            function()
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def step_bytes(shapes: dict[str, tuple[int, ...]], param_bytes: int, grad_bytes: int) -> int:
    """The module docstring's bytes per element, summed over the parameters."""
    numel = sum(torch.Size(shape).numel() for shape in shapes.values())
    separate_master = param_bytes if param_bytes != 4 else 0
    return numel * ((12 + grad_bytes) + (24 + grad_bytes + separate_master))


def run_variant(fused: bool, shapes, device: torch.device, *, warmup: int, repeats: int, seed: int = 0) -> dict:
    """Builds parameters, optimizer and gradients for one variant, times its steps, returns times and a sample."""
    generator = torch.Generator(device=device).manual_seed(seed)
    params = {name: torch.nn.Parameter(torch.randn(shape, generator=generator, device=device).to(torch.bfloat16))
              for name, shape in shapes.items()}
    grads = {name: torch.randn(shape, generator=generator, device=device) for name, shape in shapes.items()}
    optimizer = MasterAdamW(params.items(), lr=1e-5, weight_decay=0.1, fused=fused)
    assert optimizer._runs_fused(list(shapes)) is fused
    applied = []
    seconds = median_seconds(lambda: applied.append(optimizer.step(None, grads)), device, warmup=warmup,
                             repeats=repeats)
    synchronize(device)
    sample = {name: optimizer.masters[name].reshape(-1)[-4096:].clone().cpu() for name in list(shapes)[:3]}
    result = {"variant": "fused" if fused else "foreach", "ms_per_step": seconds * 1000, "all_applied": all(applied),
              "steps": len(applied)}
    del params, grads, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result, sample


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def table(report: dict) -> str:
    lines = [f"MasterAdamW.step, {report['model']} shapes ({report['num_tensors']} tensors, "
             f"{report['num_elements'] / 1e6:,.1f}M elements), bf16 params, fp32 grads, on {report['device']}",
             f"copy bandwidth {report['copy_bandwidth_gb_s']:.0f} GB/s; a step must move {report['gb_moved']:.2f} GB:"
             f" roofline {report['roofline_ms']:.2f} ms",
             f"{'variant':<10}{'ms/step':>12}{'GB/s':>10}{'of roofline':>14}{'speedup':>10}"]
    baseline = report["results"][0]["ms_per_step"]
    for row in report["results"]:
        lines.append(f"{row['variant']:<10}{row['ms_per_step']:>12.2f}{row['gb_s']:>10.0f}"
                     f"{row['roofline_fraction']:>14.1%}{baseline / row['ms_per_step']:>9.2f}x")
    if "max_difference_over_max_weight" in report:
        lines.append(f"fused vs foreach masters (last 4096 elements of 3 tensors): max difference / max weight "
                     f"{report['max_difference_over_max_weight']:.2e}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON results path; a .txt table is written beside it")
    parser.add_argument("--tiny", action="store_true", help="tiny qwen2 shapes (CPU smoke run)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per variant (the median is reported)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = parameter_shapes(args.tiny)
    variants = [False, True] if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else [False]
    bandwidth = copy_bandwidth(device, (2 << 30) if device.type == "cuda" else (64 << 20))
    moved = step_bytes(shapes, param_bytes=2, grad_bytes=4)
    report = {"model": "tiny qwen2" if args.tiny else MODEL, "num_tensors": len(shapes),
              "num_elements": sum(torch.Size(shape).numel() for shape in shapes.values()),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "triton": _triton_version(), "copy_bandwidth_gb_s": bandwidth / 1e9,
              "gb_moved": moved / 1e9,
              "roofline_ms": moved / bandwidth * 1000, "results": []}
    samples = []
    for fused in variants:
        result, sample = run_variant(fused, shapes, device, warmup=args.warmup, repeats=args.repeats)
        result["gb_s"] = moved / (result["ms_per_step"] / 1000) / 1e9
        result["roofline_fraction"] = report["roofline_ms"] / result["ms_per_step"]
        report["results"].append(result)
        samples.append(sample)
    if len(samples) == 2:
        report["max_difference_over_max_weight"] = max(
            ((samples[1][name] - samples[0][name]).abs().max() / samples[0][name].abs().max()).item()
            for name in samples[0])
    text = table(report)
    print(text, end="")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".txt").write_text(text)


if __name__ == "__main__":
    main()

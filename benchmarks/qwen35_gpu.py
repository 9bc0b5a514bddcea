"""Qwen3.5 on one GPU: flash-linear-attention's core against the torch core, and Qwen3.5 beside Qwen3 of similar size.

Random bf16 weights from the shipped configs (Qwen3.5-0.8B and 4B text models; Qwen3-0.6B's published shapes,
inline, and the shipped Qwen3-4B). Parts (--parts, default all):

- core: packed forward + backward (and the no-grad forward of teacher scoring) over 8,192 tokens of 16 packed
  sequences, for one Qwen3.5-0.8B-shaped linear-attention layer and for the whole 0.8B model (hidden states only:
  a cheap loss on them, no lm_head), with the fla core, the batched torch core (kernels/fla_linear_attention.py,
  models/linear_attention_backend.py) and the former per-sequence torch core (torch_seq: one sequence and one
  chunk after another, linear_attention_backend.packed_forward_per_sequence). Also the one layer's measured memory
  against the plan's formulas: saved activations (sizing.linear_layer_bytes_per_token), the no-grad forward's peak
  inside the fla core (sizing.fla_core_peak_bytes) and inside the torch core (sizing.linear_core_peak_bytes).
- cpu_core: one 0.8B-shaped linear-attention layer on the CPU, 2,048 tokens of 8 packed sequences, fp32, fwd+bwd
  and no-grad forward with the batched and the per-sequence torch cores (runs anywhere; no GPU needed).
- decode: rollout decode (flashinfer prefill, CUDA-graph decode bursts of 16 steps, batch 64 and 128, 128-token
  prompts, 256 new tokens, EOS suppressed) of Qwen3.5-0.8B with either core against Qwen3-0.6B; ms per decode step
  from the burst records (benchmarks/rollout_gpu.py run_variant).
- step: one OPD step through the real runtime (benchmarks/step_timing.py run_ours: plan, build_context, the executor),
  Qwen3.5-0.8B <- Qwen3.5-4B against Qwen3-0.6B <- Qwen3-4B, 32 sequences of 128 prompt + 256 response tokens;
  per-stage seconds and the plan's predicted peak beside the measured one.

Writes JSON (--out) and the same tables as text (--out with .txt). Not a test. ``--smoke`` runs the core and step
parts on the CPU with tiny models and the torch core only (a check of this script, no figures).

    python benchmarks/qwen35_gpu.py --out qwen35.json [--parts step,decode,core]
    python benchmarks/qwen35_gpu.py --smoke --parts core,step --out /tmp/qwen35_smoke.json
    python benchmarks/qwen35_gpu.py --parts cpu_core --out /tmp/qwen35_cpu_core.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIGS = Path(__file__).resolve().parent.parent / "opdgraph" / "model_configs"
GIB = 2**30
LENGTHS = [1024] * 4 + [512] * 4 + [256] * 8  # 8,192 packed tokens, 16 sequences (several fla chunks each)
CPU_LENGTHS = [512] * 2 + [256] * 2 + [128] * 4  # cpu_core: 2,048 packed tokens, 8 sequences
SMOKE = {"on": False}  # --smoke: CPU, tiny models, the torch core only
CPU = {"on": False}  # cpu_core: real widths, on the CPU, fp32


def device() -> str:
    return "cpu" if SMOKE["on"] or CPU["on"] else "cuda"


def on_cpu() -> bool:
    return device() == "cpu"


def read_config(name: str) -> dict:
    if SMOKE["on"]:
        from opdgraph.models.tiny_configs import tiny_config

        family = "qwen3_5" if "qwen3.5" in name else "qwen3"
        config = tiny_config(family)
        if "4b" in name:
            config.update(hidden_size=96)
        return config
    return json.loads((CONFIGS / name).read_text())


def qwen3_0b6() -> dict:
    """Qwen3-0.6B's published shapes on the shipped Qwen3-4B config's keys."""
    if SMOKE["on"]:
        return read_config("qwen3-0.6b")
    return {**read_config("qwen3-4b.json"), "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
            "num_attention_heads": 16, "num_key_value_heads": 8, "max_window_layers": 28}


def synchronize() -> None:
    if not on_cpu():
        torch.cuda.synchronize()


def allocated() -> int:
    return 0 if on_cpu() else torch.cuda.memory_allocated()


def peak_since_reset() -> int:
    return 0 if on_cpu() else torch.cuda.max_memory_allocated()


def reset_peak() -> None:
    if not on_cpu():
        torch.cuda.reset_peak_memory_stats()


def free_memory() -> None:
    gc.collect()
    if not on_cpu():
        torch.cuda.empty_cache()


def timed(function, repeats: int) -> float:
    """Mean seconds of `function` after one warmup call."""
    function()
    synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    synchronize()
    return (time.perf_counter() - started) / repeats


def core(name: str):
    import functools

    from opdgraph.kernels.fla_linear_attention import FlaLinearAttention
    from opdgraph.models import linear_attention_backend as backend

    class PerSequenceTorchLinearAttention(backend.TorchLinearAttention):
        """The torch core as it was before the batched one: packed sequences one after another."""

        def packed(self, mixed, weight, decay, beta, dims, *, meta):
            per_sequence = functools.partial(backend.packed_forward_per_sequence, bounds=meta.cu_seqlens.tolist(),
                                             dims=dims)
            return backend.recomputed(per_sequence, mixed, weight, decay, beta)

    return {"fla": FlaLinearAttention, "torch": backend.TorchLinearAttention,
            "torch_seq": PerSequenceTorchLinearAttention}[name]()


# ------------------------------------------------------------------------------------------------------ core
def packed_batch(vocab: int):
    from opdgraph.models.packing import pack

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (sum(lengths_used()),), generator=generator)
    return pack([part.tolist() for part in ids.split(lengths_used())], device())


def lengths_used() -> list[int]:
    return [40, 70, 9] if SMOKE["on"] else CPU_LENGTHS if CPU["on"] else LENGTHS


def core_rows(label: str, config: dict, repeats: dict, names=("fla", "torch", "torch_seq"),
              dtype=torch.bfloat16) -> list[dict]:
    """fwd+bwd and no-grad forward of `config` with each core (the model's hidden states, a cheap loss)."""
    from opdgraph import sizing
    from opdgraph.model_shapes import shape_from_hf_config
    from opdgraph.models import load_decoder

    model = load_decoder(config, dtype=dtype, device=device(), init_device="device")
    shape = shape_from_hf_config(config)
    ids, positions, meta = packed_batch(config["vocab_size"])
    dtype_bytes = torch.finfo(dtype).bits // 8
    rows = []
    for name in ("torch", "torch_seq") if SMOKE["on"] else names:
        model.set_linear_attention_backend(core(name))
        model.zero_grad(set_to_none=True)

        def train():
            model.forward_hidden(ids, positions, meta).float().square().mean().backward()

        def score():
            with torch.no_grad():
                model.forward_hidden(ids, positions, meta)

        try:
            row = dict(what=label, core=name, tokens=len(ids), sequences=len(lengths_used()),
                       fwd_bwd_ms=1000 * timed(train, repeats[name]), no_grad_fwd_ms=1000 * timed(score, repeats[name]))
            # Memory of one step beyond the weights and the gradients (kept from the timed calls).
            synchronize()
            reset_peak()
            base = allocated()
            hidden = model.forward_hidden(ids, positions, meta)
            row["saved_activations_mib"] = (allocated() - base) / 2**20
            hidden.float().square().mean().backward()
            del hidden
            row["fwd_bwd_peak_mib"] = (peak_since_reset() - base) / 2**20
            reset_peak()
            base = allocated()
            score()
            row["no_grad_peak_mib"] = (peak_since_reset() - base) / 2**20
            if shape.layers == 1:
                tokens = len(ids)
                row["plan_saved_activations_mib"] = sizing.activation_bytes(shape, tokens, dtype_bytes,
                                                                            False) / 2**20
                sequences = len(lengths_used())
                row["plan_fla_core_peak_mib"] = sizing.fla_core_peak_bytes(shape, tokens, sequences, dtype_bytes,
                                                                           paged=False) / 2**20
                row["plan_torch_core_peak_mib"] = sizing.linear_core_peak_bytes(
                    shape, tokens, dtype_bytes, sequences) / 2**20
                if name != "torch_seq":  # the former per-sequence core is no runtime path: no plan sizes it
                    row["plan_forward_workspace_mib"] = sizing.forward_workspace_bytes(  # the core this row runs
                        shape, tokens, dtype_bytes, fla_sequences=sequences if name == "fla" else 0,
                        sequences=sequences) / 2**20
        except Exception:  # noqa: BLE001 -- one failing row must not hide the others
            row = dict(what=label, core=name, error=traceback.format_exc())
            print(row["error"], flush=True)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def run_core(args) -> list[dict]:
    student = read_config("qwen3.5-0.8b-text.json")
    layer = {**student, "num_hidden_layers": 1, "layer_types": ["linear_attention"], "vocab_size": 1024}
    rows = core_rows("one 0.8B linear-attention layer", layer, {"fla": 10, "torch": 3, "torch_seq": 3})
    free_memory()
    rows += core_rows("Qwen3.5-0.8B (24 layers)", student, {"fla": 3, "torch": 1, "torch_seq": 1})
    free_memory()
    return rows


def run_cpu_core(args) -> list[dict]:
    """One 0.8B-shaped linear-attention layer on the CPU (fp32), batched against per-sequence torch core."""
    CPU["on"] = True
    try:
        layer = {**read_config("qwen3.5-0.8b-text.json"), "num_hidden_layers": 1,
                 "layer_types": ["linear_attention"], "vocab_size": 1024}
        return core_rows("one 0.8B linear layer, CPU fp32", layer, {"torch": 2, "torch_seq": 2},
                         names=("torch", "torch_seq"), dtype=torch.float32)
    finally:
        CPU["on"] = False


# ---------------------------------------------------------------------------------------------------- decode
def run_decode(args) -> list[dict]:
    from rollout_gpu import copy_bandwidth, run_variant

    from opdgraph.models import load_decoder

    options = types.SimpleNamespace(prompt_tokens=128, page_size=16, prefill_budget=8192)
    bandwidth = copy_bandwidth(torch.device("cuda"))
    rows = []
    for label, config, core_name in (("Qwen3.5-0.8B", read_config("qwen3.5-0.8b-text.json"), "fla"),
                                     ("Qwen3.5-0.8B", read_config("qwen3.5-0.8b-text.json"), "torch"),
                                     ("Qwen3-0.6B", qwen3_0b6(), None)):
        model = load_decoder(config, dtype=torch.bfloat16, device="cuda", init_device="device")
        if core_name is not None:
            model.set_linear_attention_backend(core(core_name))
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        for batch_size in (64, 128):
            name = f"{label} {core_name or 'attention only'} bursts16 bs{batch_size}"
            print(f"running {name} ...", flush=True)
            try:
                row = run_variant(model, options, bandwidth, weight_bytes, name=name, attention="flashinfer",
                                  cuda_graphs=True, batch_size=batch_size, new_tokens=256, decode_burst_steps=16)
                if getattr(model, "recurrent", False):
                    row["state_bytes_per_sequence"] = sum(layer.nbytes for layer in model.allocate_kv_cache(
                        1, 16, num_state_slots=1) if not isinstance(layer, torch.Tensor))
            except Exception:  # noqa: BLE001
                row = dict(name=name, error=traceback.format_exc())
                print(row["error"], flush=True)
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------------ step
def run_step(args) -> list[dict]:
    import step_pipeline
    import step_timing

    StepShape = step_pipeline.StepShape
    shape = StepShape("Q", 4, 16, 8, 1) if SMOKE["on"] else StepShape("Q", 32, 128, 256, 2)
    options = types.SimpleNamespace(tiny=SMOKE["on"], micro_batch_tokens=96 if SMOKE["on"] else 8192,
                                    chunk_tokens=16 if SMOKE["on"] else 2048, cpu_init=SMOKE["on"], warmup=1,
                                    profile=False)
    pairs = {"Qwen3.5-0.8B <- Qwen3.5-4B": (read_config("qwen3.5-0.8b-text.json"),
                                           read_config("qwen3.5-4b-text.json")),
             "Qwen3-0.6B <- Qwen3-4B": (qwen3_0b6(), read_config("qwen3-4b.json"))}
    rows = []
    original = step_pipeline.model_configs
    for label, configs in pairs.items():
        step_pipeline.model_configs = lambda tiny, configs=configs: configs  # write_pipeline reads the pair from here
        print(f"running OPD step {label} ...", flush=True)
        try:
            with tempfile.TemporaryDirectory() as work_dir:
                result = step_timing.run_ours(shape, options, Path(work_dir), {})
            measured = [s for s in result["steps"] if not s["warmup"]]
            stages = {}
            for record in measured:
                for stage_name, seconds in record["stages"].items():
                    stages[stage_name] = stages.get(stage_name, 0.0) + seconds / len(measured)
            row = dict(pair=label, step_seconds=sum(s["seconds"] for s in measured) / len(measured),
                       stage_seconds=stages, measured_peak_gib=max(s["peak_gib"] or 0 for s in measured),
                       predicted_peak_gib=result["predicted_peak_gib"], rollout=result["rollout_attention"],
                       raw=result)
        except Exception:  # noqa: BLE001
            row = dict(pair=label, error=traceback.format_exc())
            print(row["error"], flush=True)
        finally:
            step_pipeline.model_configs = original
            free_memory()
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "raw"}, default=str), flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------- report
def tables(report: dict) -> str:
    lines = [f"{report['device']}, torch {report['torch']}, {report['linear_attention']}", ""]
    for part in ("core", "cpu_core"):
        if part not in report:
            continue
        batch = "2048 tokens / 8 seqs" if part == "cpu_core" else "8192 tokens / 16 seqs"
        lines.append(f"{'packed fwd+bwd, ' + batch:<40} "
                     f"{'core':<9} {'fwd+bwd ms':>10} {'no-grad ms':>10} {'saved MiB':>9} {'plan':>7} "
                     f"{'no-grad peak':>12} {'plan fla':>8} {'fwd+bwd peak':>12} {'plan torch':>10}")
        for row in report[part]:
            if "error" in row:
                lines.append(f"{row['what']:<40} {row['core']:<9} error (see JSON)")
                continue
            lines.append(f"{row['what']:<40} {row['core']:<9} {row['fwd_bwd_ms']:>10.1f} "
                         f"{row['no_grad_fwd_ms']:>10.1f} {row['saved_activations_mib']:>9.0f} "
                         f"{row.get('plan_saved_activations_mib', 0):>7.0f} "
                         f"{row['no_grad_peak_mib']:>12.0f} {row.get('plan_fla_core_peak_mib', 0):>8.0f} "
                         f"{row['fwd_bwd_peak_mib']:>12.0f} {row.get('plan_torch_core_peak_mib', 0):>10.0f}")
        lines.append("")
    if "decode" in report:
        lines.append(f"{'decode (bursts of 16, graphs)':<52} {'ms/step':>8} {'tok/s':>9} {'e2e tok/s':>9}")
        for row in report["decode"]:
            if "error" in row:
                lines.append(f"{row['name']:<52} error (see JSON)")
                continue
            lines.append(f"{row['name']:<52} {row['ms_per_decode_step']:>8.2f} "
                         f"{row['decode_tokens_per_second']:>9.0f} {row['tokens_per_second_end_to_end']:>9.0f}")
        lines.append("")
    if "step" in report:
        lines.append(f"{'OPD step, 32 x (128 + 256) tokens':<30} {'step s':>7} {'peak GiB':>8} {'plan GiB':>8}  "
                     "stages (s)")
        for row in report["step"]:
            if "error" in row:
                lines.append(f"{row['pair']:<30} error (see JSON)")
                continue
            stages = ", ".join(f"{name} {seconds:.2f}" for name, seconds in row["stage_seconds"].items())
            lines.append(f"{row['pair']:<30} {row['step_seconds']:>7.2f} {row['measured_peak_gib']:>8.2f} "
                         f"{row['predicted_peak_gib']:>8.2f}  {stages}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parts", default="step,decode,core")  # the OPD step first: what a short call must get
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models, torch core only (checks the script)")
    args = parser.parse_args()
    SMOKE["on"] = args.smoke
    from opdgraph.kernels.fla_linear_attention import linear_backend_description

    on_gpu = not args.smoke and torch.cuda.is_available()
    report = dict(device=torch.cuda.get_device_name() if on_gpu else "cpu (smoke)" if args.smoke else "cpu",
                  torch=torch.__version__,
                  linear_attention=linear_backend_description(device()))
    print(json.dumps(report), flush=True)
    runners = {"core": run_core, "cpu_core": run_cpu_core, "decode": run_decode, "step": run_step}
    for part in args.parts.split(","):
        started = time.perf_counter()
        report[part] = runners[part](args)
        report[f"{part}_seconds"] = time.perf_counter() - started
        # Partial results survive a crash or the suite's time limit.
        args.out.write_text(json.dumps(report, indent=1, default=str))
        args.out.with_suffix(".txt").write_text(tables(report) + "\n")
    print(tables(report))
    print(f"wrote {args.out} and {args.out.with_suffix('.txt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which tensors are alive at the peak of a no-grad forward of one Qwen3.5-0.8B linear-attention layer on fla's core.

The probe behind sizing.fla_core_peak_bytes (the plan's forward workspace with fla): it records the CUDA allocator's
history around the second forward (the first compiles and autotunes), replays the alloc/free events to find the
moment of the peak, and prints every block alive then with its size and the innermost frames of our code and fla's
that allocated it, beside the plan's number. With --backward: a training backward's net peak and time, its core
recomputed in pieces and as one piece side by side (probe_backward). Needs CUDA and fla. Not a test.

    python benchmarks/fla_peak_probe.py [--backward] [--lengths 2048 --lengths 100,37,1000,3,908] [--out probe.txt]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20


def layer_model():
    from opdgraph.kernels.fla_linear_attention import FlaLinearAttention
    from opdgraph.model_shapes import shape_from_hf_config
    from opdgraph.models import load_decoder

    config = json.loads((ROOT / "opdgraph" / "model_configs" / "qwen3.5-0.8b-text.json").read_text())
    config.update(num_hidden_layers=1, layer_types=["linear_attention"], vocab_size=512)
    model = load_decoder(config, dtype=torch.bfloat16, device="cuda", init_device="device")
    model.set_linear_attention_backend(FlaLinearAttention())
    return model, shape_from_hf_config(config)


def frames_of(event) -> str:
    """The innermost frames of ours and fla's (file:line function), innermost first."""
    kept = [f"{Path(frame['filename']).name}:{frame['line']} {frame['name']}" for frame in event.get("frames", [])
            if any(part in frame["filename"] for part in ("/fla/", "opdgraph", "/kernels/", "/models/"))]
    return " < ".join(kept[:4]) or "(no frame of ours)"


def live_at_peak(trace: list[dict]) -> tuple[int, list[dict]]:
    """Replay the allocator's events: (peak bytes above the start, the blocks alive at that moment)."""
    live: dict[int, dict] = {}
    current = peak = 0
    at_peak: list[dict] = []
    for event in trace:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            current += event["size"]
            if current > peak:
                peak, at_peak = current, list(live.values())
        elif event["action"] in ("free_completed",) and event["addr"] in live:
            current -= live.pop(event["addr"])["size"]
    return peak, at_peak


def probe(model, shape, lengths: tuple[int, ...]) -> str:
    from opdgraph import sizing
    from opdgraph.models.packing import pack

    tokens = sum(lengths)
    ids, positions, meta = pack([torch.randint(0, 512, (length,)).tolist() for length in lengths], "cuda")
    with torch.no_grad():
        model.forward_hidden(ids, positions, meta)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(max_entries=100000)
        model.forward_hidden(ids, positions, meta)
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
    measured = torch.cuda.max_memory_allocated() - base
    planned = sizing.forward_workspace_bytes(shape, tokens, 2, fla_sequences=len(lengths))
    trace = [event for device in snapshot["device_traces"] for event in device]
    replayed, blocks = live_at_peak(trace)
    lines = [f"lengths {lengths}: measured {measured / MIB:.3f} MiB, replayed {replayed / MIB:.3f} MiB, plan "
             f"{planned / MIB:.3f} MiB ({(planned - measured) / MIB:+.3f}); {len(blocks)} blocks alive at the peak:"]
    for block in sorted(blocks, key=lambda event: -event["size"]):
        lines.append(f"  {block['size']:>11,d} B  {block['size'] / tokens:>9.1f} B/token  {frames_of(block)}")
    return "\n".join(lines)


def probe_backward(model, shape, lengths: tuple[int, ...]) -> str:
    """The same for a training backward: the layer's RecomputedCore recomputes and differentiates its core (the
    torch core where fla's backward is refused), in pieces of RECOMPUTE_PADDED_TOKENS padded tokens and, side by
    side, as one piece; each against the plan (sizing.linear_recompute_workspace_bytes less what the backward frees
    of the layer's activations first, and linear_recompute_peak_bytes at these lengths' padded tokens for one
    piece), with the backward's time (CUDA events, the best of three)."""
    from opdgraph import sizing
    from opdgraph.models import linear_attention_backend
    from opdgraph.models.packing import pack

    tokens = sum(lengths)
    ids, positions, meta = pack([torch.randint(0, 512, (length,)).tolist() for length in lengths], "cuda")
    # Every weight learns, so the layer saves what it saves in training. The loss is a product with a constant
    # direction, which saves nothing of the hidden state (a square would keep an fp32 copy, freed first).
    direction = torch.randn(tokens, shape.hidden, device="cuda", dtype=torch.bfloat16)
    grads = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    freed = sizing.freed_before_last_linear_core_bytes(shape, tokens, 2, False)
    budget = linear_attention_backend.RECOMPUTE_PADDED_TOKENS
    padded = sum(-(-length // sizing.LINEAR_CHUNK_TOKENS) * sizing.LINEAR_CHUNK_TOKENS for length in lengths)
    lines = [f"backward, lengths {lengths[:4]}{'...' if len(lengths) > 4 else ''} ({len(lengths)} sequences, {tokens} "
             f"tokens, {padded} padded; the model's weight gradients are in the measured peak where they exist by "
             f"then):"]
    for label, pieces in (("pieces", budget), ("one piece", 1 << 40)):
        linear_attention_backend.RECOMPUTE_PADDED_TOKENS = pieces
        peaks, times = [], []
        try:
            for _ in range(4):  # the first compiles and autotunes
                loss = (model.forward_hidden(ids, positions, meta) * direction).float().sum()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                begin, finish = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                loss.backward()
                finish.record()
                torch.cuda.synchronize()
                peaks.append(torch.cuda.max_memory_allocated() - base)
                times.append(begin.elapsed_time(finish))
                model.zero_grad(set_to_none=True)
        finally:
            linear_attention_backend.RECOMPUTE_PADDED_TOKENS = budget
        if pieces == budget:
            plan = sizing.linear_recompute_workspace_bytes(shape, tokens, 2, len(lengths), max(lengths))
        else:
            plan = sizing.linear_recompute_peak_bytes(shape, tokens, 2, len(lengths), padded_tokens=padded)
        net = plan - freed  # the plan holds the gradients apart: beside the measured peak, all of them at most
        lines.append(f"  {label:<9} measured {peaks[-1] / MIB:9.1f} MiB above the forward's activations, plan "
                     f"{net / MIB:9.1f} MiB + gradients {grads / MIB:.1f} ({(net + grads) / peaks[-1]:.3f} x; "
                     f"recompute {plan / MIB:.1f} less freed {freed / MIB:.1f}); backward {min(times[1:]):7.2f} ms")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", action="append", help="comma-separated packed lengths (repeatable)")
    parser.add_argument("--out", help="also write the report here")
    parser.add_argument("--backward", action="store_true", help="probe the training backward instead")
    args = parser.parse_args()
    default = (["15000", ",".join(["1070"] * 14), ",".join(["120"] * 128)] if args.backward
               else ["2048", "512,512,512,512", "100,37,1000,3,908"])
    cases = [tuple(int(n) for n in text.split(",")) for text in (args.lengths or default)]
    model, shape = layer_model()
    run = probe_backward if args.backward else probe
    report = "\n\n".join(run(model, shape, lengths) for lengths in cases)
    print(report)
    if args.out:
        Path(args.out).write_text(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n{report}\n")


if __name__ == "__main__":
    sys.exit(main())

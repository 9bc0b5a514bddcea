"""Rollout decode throughput on one CUDA GPU: flashinfer (eager, CUDA graphs, fp8 KV) vs the torch backend, vs the
memory-bandwidth roofline, vs transformers ``generate``.

Qwen2.5-1.5B shapes (opdgraph/model_configs/qwen2.5-1.5b-instruct.json) with random bf16 weights; EOS is never a
stop token, so every response has exactly the requested length. Prompts of 256 random tokens, sampling at
temperature 1 (the counter-based race over the whole vocabulary) unless a variant says greedy.

Per decode step the GPU must at least read every weight once and the K/V of every cached token: the roofline time
of a step is (weight bytes + context tokens x KV bytes per token) / copy bandwidth, where the copy bandwidth is
measured here with a large device-to-device copy (bytes read + written per second). "roofline" is that time over
the measured step time (host-side wall time between step ends, so scheduling and the per-step sync count).

Slow variants are timed over their last --timed-steps decode steps after a short warmup, not 1024 tokens; the table
says how many steps each number averages. Each engine first runs a tiny warmup generate (JIT compiles, graph
capture: reported as capture seconds), so end-to-end tokens/s is steady state; the memory columns are free GiB
before the engine, while it holds its KV pool, and after release() + empty_cache(). Not a test: prints a table and writes JSON (--out) with the card name.

transformers runs the same bs64 x 256-token workload greedy and sampled (temperature 1, no filters), each compared
with our engine in the same mode. ``--profile`` adds a torch.profiler pass over 20 decode steps of bs128 graphs
(top CUDA kernels, GPU-idle fraction, host time per phase: see rollout_profile.py); ``--only a,b`` runs only the
variants whose names contain a or b.

    python benchmarks/rollout_gpu.py --out rollout_gpu.json [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import traceback
from pathlib import Path

import torch

from rollout_profile import print_profile, profile_decode

from opdgraph.models import load_decoder
from opdgraph.rollout import Request, RolloutEngine, SamplingParams

CONFIG = Path(__file__).resolve().parents[1] / "opdgraph" / "model_configs" / "qwen2.5-1.5b-instruct.json"
GIB = 1024**3


def copy_bandwidth(device, num_bytes=2 * GIB, repeats=10) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    source = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        target.copy_(source)
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1000
    del source, target
    torch.cuda.empty_cache()
    return 2 * num_bytes * repeats / seconds


def make_requests(batch_size, prompt_tokens, new_tokens, vocab_size, greedy, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_new_tokens=new_tokens, greedy=greedy, eos_token_ids=())
    return [Request(f"p{i}", torch.randint(0, vocab_size, (prompt_tokens,), generator=generator).tolist(), params,
                    seed=i) for i in range(batch_size)]


def decode_step_times(stats, timed_steps):
    """(seconds, context tokens) of the last timed_steps decode steps that directly follow another decode step."""
    steps = stats.steps
    pairs = [(b.end_seconds - a.end_seconds, b.context_tokens) for a, b in zip(steps, steps[1:])
             if a.kind != "mixed" and b.kind != "mixed"]
    return pairs[-timed_steps:] if timed_steps else pairs


def burst_step_times(records, weight_bytes, kv_bytes, bandwidth):
    """(seconds, roofline seconds, steps, device seconds) over bursts that directly follow another burst (no
    prefill between); device seconds from the bursts' CUDA events (state copy to last step)."""
    seconds = roofline = steps = device = 0
    for previous, burst in zip(records, records[1:]):
        seconds += burst.end_seconds - previous.end_seconds
        device += burst.device_seconds
        steps += burst.steps
        for step in range(burst.steps):
            roofline += (weight_bytes + (burst.context_tokens + step * burst.rows) * kv_bytes) / bandwidth
    return seconds, roofline, steps, device


def run_variant(model, args, bandwidth, weight_bytes, *, name, attention, cuda_graphs, batch_size, new_tokens,
                kv_dtype=None, greedy=False, timed_steps=0, decode_burst_steps=1, fused_kernels=False,
                stacked_gate_up=True, fused_state=None):
    """One engine configuration timed end to end; ``stacked_gate_up`` / ``fused_state`` (None: the engine's
    choice) are the engine's and its DecodeBurst's switches."""
    prompt_tokens = args.prompt_tokens
    pages_per_seq = -(-(prompt_tokens + new_tokens) // args.page_size)
    device = torch.device("cuda")
    torch.cuda.synchronize()
    free_before, total = torch.cuda.mem_get_info()
    engine = RolloutEngine(model, page_size=args.page_size, num_pages=batch_size * pages_per_seq,
                           max_num_seqs=batch_size, prefill_token_budget=args.prefill_budget, device=device,
                           kv_dtype=kv_dtype, attention=attention, cuda_graphs=cuda_graphs,
                           decode_burst_steps=decode_burst_steps, fused_kernels=fused_kernels,
                           stacked_gate_up=stacked_gate_up)
    if fused_state is not None and engine.burst is not None:
        engine.burst.fused_state = fused_state
    # Warm up on the same engine: JIT compiles and graph captures happen here, and the graphs stay valid for the
    # timed call because the KV tensors are kept between generate calls (no release in between). Bursts warm up
    # at the timed batch size (their kernels compile per split count, which depends on it).
    warmup_started = time.perf_counter()
    warmup_batch = batch_size if decode_burst_steps > 1 else 2
    engine.generate(make_requests(warmup_batch, prompt_tokens, 2 * decode_burst_steps + 8, model.config.vocab_size,
                                  greedy, seed=1))
    warmup_seconds = time.perf_counter() - warmup_started
    capture_seconds = 0.0
    if engine.gpu_path is not None:
        capture_seconds = engine.gpu_path.stats.capture_seconds
        engine.gpu_path.stats = type(engine.gpu_path.stats)(steps=[])  # per-step records on for the timed run
    if engine.burst is not None:
        capture_seconds += engine.burst.capture_seconds
        engine.burst.records = []
    requests = make_requests(batch_size, prompt_tokens, new_tokens, model.config.vocab_size, greedy)
    responses = engine.generate(requests)
    assert all(len(r.token_ids) == new_tokens for r in responses), "EOS suppression failed: lengths differ"
    free_during, _ = torch.cuda.mem_get_info()
    stats = engine.stats
    row = dict(name=name, attention=attention, cuda_graphs=cuda_graphs, batch_size=batch_size,
               prompt_tokens=prompt_tokens, new_tokens=new_tokens, greedy=greedy,
               kv_dtype=str(kv_dtype or model.dtype), wall_seconds=stats.wall_seconds,
               tokens_per_second_end_to_end=stats.tokens_per_second, preemptions=stats.preemptions,
               warmup_seconds=warmup_seconds, capture_seconds=capture_seconds)
    kv_bytes = model.kv_bytes_per_token(kv_dtype)
    if engine.burst is not None:
        seconds, roofline, steps, device = burst_step_times(engine.burst.records, weight_bytes, kv_bytes, bandwidth)
        row.update(decode_burst_steps=decode_burst_steps, bursts=stats.bursts, timed_decode_steps=steps,
                   ms_per_decode_step=1000 * seconds / steps, decode_tokens_per_second=batch_size * steps / seconds,
                   roofline_ms_per_step=1000 * roofline / steps, fraction_of_roofline=roofline / seconds,
                   device_ms_per_decode_step=1000 * device / steps, fraction_of_roofline_device=roofline / device,
                   host_gap_fraction=1 - device / seconds, captures_in_timed_run=engine.burst.num_captures,
                   stacked_gate_up_layers=engine.stacked_gate_up_layers,
                   burst_state_kernels=engine.burst.fused_state)
        row["host_ms_per_step"] = {name: 1000 * seconds / stats.burst_steps for name, seconds in
                                   stats.host_seconds.items()}
    elif engine.gpu_path is not None:
        gpu = engine.gpu_path.stats
        times = decode_step_times(gpu, timed_steps)
        seconds = sum(t for t, _ in times)
        roofline = sum((weight_bytes + context * kv_bytes) / bandwidth for _, context in times)
        row.update(timed_decode_steps=len(times), ms_per_decode_step=1000 * seconds / len(times),
                   decode_tokens_per_second=batch_size * len(times) / seconds,
                   roofline_ms_per_step=1000 * roofline / len(times), fraction_of_roofline=roofline / seconds,
                   mean_bytes_per_step=sum(weight_bytes + c * kv_bytes for _, c in times) / len(times),
                   graph_steps=gpu.graph_steps, eager_steps=gpu.eager_steps,
                   captures_in_timed_run=gpu.num_captures)
        num_steps = stats.forwards
        row["host_ms_per_step"] = {name: 1000 * seconds / num_steps for name, seconds in
                                   [*stats.host_seconds.items(), *gpu.host_seconds.items()]}
    engine.release()
    del engine, responses
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free_after, _ = torch.cuda.mem_get_info()
    row.update(free_gib_before=free_before / GIB, free_gib_during=free_during / GIB,
               free_gib_after_release=free_after / GIB)
    return row


def torch_backend_row(model, args, bandwidth, weight_bytes, batch_size=8, short=4, long=12):
    """The plain-torch backend is slow (per-sequence python loops): time two short runs and difference them."""
    walls = {}
    for new_tokens in (short, long):
        engine = RolloutEngine(model, page_size=args.page_size, num_pages=batch_size * 32, max_num_seqs=batch_size,
                               prefill_token_budget=args.prefill_budget, device="cuda")
        engine.generate(make_requests(batch_size, args.prompt_tokens, new_tokens, model.config.vocab_size, False))
        walls[new_tokens] = engine.stats.wall_seconds
        engine.release()
    seconds = (walls[long] - walls[short]) / (long - short)
    context = batch_size * (args.prompt_tokens + (short + long) // 2)
    roofline = (weight_bytes + context * model.kv_bytes_per_token()) / bandwidth
    return dict(name="torch backend", attention="torch", cuda_graphs=False, batch_size=batch_size,
                timed_decode_steps=long - short, ms_per_decode_step=1000 * seconds,
                decode_tokens_per_second=batch_size / seconds, roofline_ms_per_step=1000 * roofline,
                fraction_of_roofline=roofline / seconds)


def transformers_row(model, config_dict, args, *, greedy, batch_size=64, new_tokens=256):
    """transformers generate (sdpa) on the same weights, greedy or sampled at temperature 1 with no filter."""
    import transformers

    from opdgraph.models.checkpoint import hf_name

    hf_config = transformers.AutoConfig.for_model(**config_dict)
    with torch.device("cuda"):  # random init on the GPU: seconds instead of a minute on the CPU
        hf_model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
    hf_model = hf_model.to(torch.bfloat16).eval()
    missing, unexpected = hf_model.load_state_dict({hf_name(k): v for k, v in model.state_dict().items()},
                                                   strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config_dict["vocab_size"], (batch_size, args.prompt_tokens), generator=generator)
    input_ids = input_ids.cuda()
    kwargs = dict(attention_mask=torch.ones_like(input_ids), pad_token_id=0, do_sample=not greedy)
    if not greedy:  # the generation config defaults to top_k=50: switch every filter off, like our sampled rows
        kwargs.update(temperature=1.0, top_k=0, top_p=1.0)
    with torch.inference_mode():
        hf_model.generate(input_ids, max_new_tokens=4, min_new_tokens=4, **kwargs)
        torch.cuda.synchronize()
        started = time.perf_counter()
        output = hf_model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    assert output.shape[1] == args.prompt_tokens + new_tokens
    del hf_model
    torch.cuda.empty_cache()
    return dict(name=f"transformers generate (sdpa, {'greedy' if greedy else 'sampled'})", attention="hf-sdpa",
                batch_size=batch_size, new_tokens=new_tokens, greedy=greedy, wall_seconds=seconds,
                tokens_per_second_end_to_end=batch_size * new_tokens / seconds)


@contextlib.contextmanager
def attention_settings(default=None, by_batch: dict | None = None):
    """Temporarily replace the decode-attention kernel's launch settings (a LaunchSettings for every batch size,
    and/or per batch size overrides)."""
    from opdgraph.kernels import paged_decode_attention as kernel

    saved = kernel.DEFAULT_SETTINGS, dict(kernel.SETTINGS_BY_BATCH)
    kernel.DEFAULT_SETTINGS = default or kernel.DEFAULT_SETTINGS
    kernel.SETTINGS_BY_BATCH.update(by_batch or {})
    try:
        yield
    finally:
        kernel.DEFAULT_SETTINGS = saved[0]
        kernel.SETTINGS_BY_BATCH.clear()
        kernel.SETTINGS_BY_BATCH.update(saved[1])


def decode_attention_setting(setting: str | None):
    """attention_settings from "BLOCK_N/NUM_WARPS/PROGRAMS_PER_SM" ("64/4/4"); no change for None."""
    from opdgraph.kernels.paged_decode_attention import LaunchSettings

    if not setting:
        return attention_settings()
    block_n, num_warps, programs_per_sm = (int(value) for value in setting.split("/"))
    return attention_settings(LaunchSettings(block_n=block_n, num_warps=num_warps, programs_per_sm=programs_per_sm))


def _ok(rows, name):
    return next((row for row in rows if row["name"] == name and "error" not in row), None)


def profile_variant(model, args, batch_size=128):
    """Top kernels, GPU-idle fraction and host split of decode bursts (rollout_profile.py): the prefill steps and 2
    bursts warm, 2 bursts timed."""
    new_tokens = 6 * args.burst

    def make_engine():
        pages_per_seq = -(-(args.prompt_tokens + new_tokens) // args.page_size)
        return RolloutEngine(model, page_size=args.page_size, num_pages=batch_size * pages_per_seq,
                             max_num_seqs=batch_size, prefill_token_budget=args.prefill_budget, device="cuda",
                             attention="flashinfer", cuda_graphs=True, decode_burst_steps=args.burst,
                             fused_kernels=True)

    requests = make_requests(batch_size, args.prompt_tokens, new_tokens, model.config.vocab_size, greedy=False)
    prefill_steps = -(-batch_size * args.prompt_tokens // args.prefill_budget)  # engine steps before the bursts
    return profile_decode(make_engine, requests, warm_steps=prefill_steps + 2, profiled_steps=2,
                          device_steps_per_step=args.burst)


def print_table(rows):
    header = (f"{'variant':<42} {'bs':>4} {'new':>5} {'steps':>5} {'ms/step':>8} {'roof ms':>8} {'roof%':>6} "
              f"{'dec tok/s':>10} {'e2e tok/s':>10} {'capture s':>9} {'free GiB b/d/a':>18}")
    print(header)
    print("-" * len(header))

    def fmt(row, key, spec):
        if isinstance(row.get(key), (int, float)):
            return format(row[key], spec)
        return format("-", spec.rstrip("f").split(".")[0])

    for row in rows:
        if "error" in row:
            print(f"{row['name']:<42} ERROR: {row['error'].splitlines()[-1]}")
            continue
        memory = "-"
        if "free_gib_before" in row:
            memory = f"{row['free_gib_before']:.1f}/{row['free_gib_during']:.1f}/{row['free_gib_after_release']:.1f}"
        print(f"{row['name']:<42} {row['batch_size']:>4} {fmt(row, 'new_tokens', '>5')} "
              f"{fmt(row, 'timed_decode_steps', '>5')} {fmt(row, 'ms_per_decode_step', '>8.2f')} "
              f"{fmt(row, 'roofline_ms_per_step', '>8.2f')} "
              f"{(format(100 * row['fraction_of_roofline'], '>5.1f') + '%') if 'fraction_of_roofline' in row else '-':>6} "
              f"{fmt(row, 'decode_tokens_per_second', '>10.0f')} {fmt(row, 'tokens_per_second_end_to_end', '>10.0f')} "
              f"{fmt(row, 'capture_seconds', '>9.2f')} {memory:>18}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("rollout_gpu.json"))
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--batch-sizes", default="64,128,256")
    parser.add_argument("--timed-steps", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--prefill-budget", type=int, default=8192)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--profile", action="store_true", help="also profile 20 decode steps of bs128 graphs (sampled)")
    parser.add_argument("--burst", type=int, default=16, help="decode_burst_steps of the burst variants")
    parser.add_argument("--attention-settings", default="",
                        help="extra burst variants with decode-attention launch settings, comma list of "
                             "BLOCK_N/NUM_WARPS/PROGRAMS_PER_SM, e.g. 64/4/4,32/4/2")
    parser.add_argument("--only", default="", help="run only variants whose name contains one of these (comma list)")
    parser.add_argument("--config-set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a key of the model config (JSON value), e.g. intermediate_size=4480 for the "
                             "per-GPU shapes of a 2-way tensor-parallel split")
    args = parser.parse_args()
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    short_tokens = 32 + args.timed_steps

    import flashinfer

    device = torch.device("cuda")
    config_dict = json.loads(CONFIG.read_text())
    for item in args.config_set:
        key, _, value = item.partition("=")
        config_dict[key] = json.loads(value)
    model = load_decoder(config_dict, dtype=torch.bfloat16, device=device, init_seed=0)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(device)
    header = dict(device=torch.cuda.get_device_name(device), torch=torch.__version__,
                  flashinfer=flashinfer.__version__, copy_bandwidth_gb_s=bandwidth / 1e9, weight_bytes=weight_bytes,
                  kv_bytes_per_token_bf16=model.kv_bytes_per_token(), model=str(CONFIG.name))
    print(json.dumps(header, indent=1), flush=True)

    plans = [dict(name="torch backend", special="torch")]
    for size in batch_sizes[:2]:
        plans.append(dict(name=f"flashinfer eager bs{size}", attention="flashinfer", cuda_graphs=False,
                          batch_size=size, new_tokens=short_tokens, timed_steps=args.timed_steps))
    for size in batch_sizes:
        plans.append(dict(name=f"flashinfer + graphs bs{size}", attention="flashinfer", cuda_graphs=True,
                          batch_size=size, new_tokens=args.new_tokens))
    bursts = dict(attention="flashinfer", cuda_graphs=True, decode_burst_steps=args.burst, fused_kernels=True)
    plans.append(dict(name=f"bursts{args.burst} unfused bs128", **{**bursts, "fused_kernels": False},
                      batch_size=128, new_tokens=args.new_tokens))
    for size in batch_sizes:
        plans.append(dict(name=f"bursts{args.burst} bs{size}", **bursts, batch_size=size,
                          new_tokens=args.new_tokens))
    plans.append(dict(name=f"bursts{args.burst} + fp8 KV bs128", **bursts, batch_size=128,
                      new_tokens=args.new_tokens, kv_dtype=torch.float8_e4m3fn))
    plans.append(dict(name=f"bursts{args.burst} bs32", **bursts, batch_size=32, new_tokens=256))
    for setting in args.attention_settings.split(",") if args.attention_settings else []:
        for size in (32, 128):  # the decode-attention kernel's launch settings, end to end
            plans.append(dict(name=f"bursts{args.burst} attn[{setting}] bs{size}", **bursts, batch_size=size,
                              new_tokens=args.new_tokens if size == 128 else 256, attention_setting=setting))
    for size in batch_sizes[1:]:
        plans.append(dict(name=f"flashinfer + graphs + fp8 KV bs{size}", attention="flashinfer", cuda_graphs=True,
                          batch_size=size, new_tokens=args.new_tokens, kv_dtype=torch.float8_e4m3fn))
    for greedy in (True, False):
        mode = "greedy" if greedy else "sampled"
        plans.append(dict(name=f"flashinfer + graphs {mode} bs64 (vs HF)", attention="flashinfer", cuda_graphs=True,
                          batch_size=64, new_tokens=256, greedy=greedy))
        plans.append(dict(name=f"bursts{args.burst} {mode} bs64 (vs HF)", **bursts, batch_size=64, new_tokens=256,
                          greedy=greedy))
        if not args.skip_transformers:
            plans.append(dict(name=f"transformers {mode}", special="hf", greedy=greedy))

    if args.only:
        wanted = args.only.split(",")
        plans = [plan for plan in plans if any(word in plan["name"] for word in wanted)]
    rows = []
    for plan in plans:
        started = time.perf_counter()
        print(f"running {plan['name']} ...", flush=True)
        try:
            special = plan.pop("special", None)
            if special == "torch":
                row = torch_backend_row(model, args, bandwidth, weight_bytes)
            elif special == "hf":
                row = transformers_row(model, config_dict, args, greedy=plan["greedy"])
            else:
                with decode_attention_setting(plan.pop("attention_setting", None)):
                    row = run_variant(model, args, bandwidth, weight_bytes, **plan)
        except Exception:  # noqa: BLE001 -- one failing variant must not hide the others' numbers
            row = dict(name=plan["name"], error=traceback.format_exc())
            print(row["error"], flush=True)
        row["seconds_to_run"] = time.perf_counter() - started
        rows.append(row)
        print(json.dumps(row), flush=True)

    profile = None
    if args.profile:
        print(f"profiling bursts{args.burst} bs128 (sampled) ...", flush=True)
        try:
            profile = profile_variant(model, args)
        except Exception:  # noqa: BLE001 -- the profile must not hide the table
            profile = dict(error=traceback.format_exc())
            print(profile["error"], flush=True)
    for mode in ("greedy", "sampled"):
        hf = _ok(rows, f"transformers generate (sdpa, {mode})")
        for engine_kind in ("flashinfer + graphs", f"bursts{args.burst}"):
            ours = _ok(rows, f"{engine_kind} {mode} bs64 (vs HF)")
            if ours and hf:
                header[f"speedup_vs_transformers_bs64_256_{mode} ({engine_kind})"] = (
                    ours["tokens_per_second_end_to_end"] / hf["tokens_per_second_end_to_end"])
    print()
    print(f"{header['device']}: copy bandwidth {bandwidth / 1e9:.0f} GB/s, weights {weight_bytes / 1e9:.2f} GB, "
          f"KV {header['kv_bytes_per_token_bf16']} B/token (bf16)")
    print_table(rows)
    for key, ratio in header.items():
        if key.startswith("speedup_vs_transformers"):
            print(f"{key}: {ratio:.2f}x tokens/s (end to end, engine vs transformers generate, same mode)")
    print("\nhost ms per step (engine: schedule/build_inputs/update; GPU path: stage/copy_inputs/plan/replay_launch/"
          "sync, where sync includes waiting for the GPU)")
    for row in rows:
        if "host_ms_per_step" in row:
            print(f"{row['name']:<40} " + " ".join(f"{name} {ms:.3f}" for name, ms in row["host_ms_per_step"].items()))
    if profile is not None and "error" not in profile:
        print_profile(profile)
    args.out.write_text(json.dumps(dict(header=header, rows=rows, profile=profile), indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Where the time of a rollout decode step goes on the GPU machine (``benchmarks/rollout_gpu.py --profile``).

For one variant (flashinfer + CUDA graphs, sampled, default batch 128) it runs the engine twice over the same
requests and looks at a window of decode steps after the prefill:
1. unprofiled: the host seconds per step of each phase (engine: schedule, build_inputs, update; GPU path: stage,
   copy_inputs, plan, replay_launch, sync) from the always-on counters, and the wall time per step;
2. under torch.profiler: the top CUDA kernels by total time and the GPU-idle fraction of the window (1 - union of
   device activity / span from the first to the last device activity).
"""

from __future__ import annotations

import time

import torch

ENGINE_PHASES = ("schedule", "build_inputs", "update", "burst")
GPU_PHASES = ("stage", "copy_inputs", "plan", "replay_launch", "sync")


def profile_decode(make_engine, requests, warm_steps: int = 12, profiled_steps: int = 20, top: int = 15,
                   device_steps_per_step: int = 1) -> dict:
    """Profile engine steps warm_steps+1 .. warm_steps+profiled_steps of ``engine.generate(requests)``; figures
    are per device decode step (an engine step of a decode burst runs ``device_steps_per_step`` of them)."""
    engine = make_engine()
    engine.generate(requests[:2])  # JIT compiles and graph captures out of the window
    split, wall = _window(engine, requests, warm_steps, profiled_steps, profiler=None)
    from torch.profiler import ProfilerActivity, profile

    profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    _window(engine, requests, warm_steps, profiled_steps, profiler=profiler)
    engine.release()
    kernels, idle = _device_summary(profiler, top)
    steps = profiled_steps * device_steps_per_step
    return dict(batch_size=len(requests), profiled_steps=steps, wall_ms_per_step=1000 * wall / steps,
                host_ms_per_step={name: 1000 * seconds / steps for name, seconds in split.items()},
                gpu_idle_fraction=idle, top_kernels=kernels)


def _window(engine, requests, warm_steps, profiled_steps, profiler):
    """Run generate; return host seconds per phase and wall seconds over the window of steps."""
    state = dict(step=0, before=None, started=0.0, split=None, wall=0.0)
    original_step = engine._step

    def counters(stats):
        gpu = engine.gpu_path.stats.host_seconds if engine.gpu_path is not None else {}
        return {**{name: stats.host_seconds.get(name, 0.0) for name in ENGINE_PHASES},
                **{name: gpu.get(name, 0.0) for name in GPU_PHASES}}

    def step(scheduler, stats):
        state["step"] += 1
        if state["step"] == warm_steps + 1:
            _synchronize()
            if profiler is not None:
                profiler.__enter__()
            state["before"], state["started"] = counters(stats), time.perf_counter()
        original_step(scheduler, stats)
        if state["step"] == warm_steps + profiled_steps:
            _synchronize()
            state["wall"] = time.perf_counter() - state["started"]
            after = counters(stats)
            state["split"] = {name: after[name] - state["before"][name] for name in after}
            if profiler is not None:
                profiler.__exit__(None, None, None)

    engine._step = step
    try:
        engine.generate(requests)
    finally:
        del engine._step
    if state["split"] is None:
        raise RuntimeError(f"generate took fewer than {warm_steps + profiled_steps} steps; raise new tokens")
    return state["split"], state["wall"]


def _synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _device_summary(profiler, top):
    """(top kernels [(name, calls, total ms)], GPU-idle fraction) from the profiler's device events."""
    totals: dict[str, list] = {}
    intervals = []
    for event in profiler.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        start, end = event.time_range.start, event.time_range.end
        intervals.append((start, end))
        entry = totals.setdefault(event.name, [0, 0.0])
        entry[0] += 1
        entry[1] += (end - start) / 1000
    ranked = sorted(totals.items(), key=lambda item: -item[1][1])[:top]
    kernels = [dict(name=name, calls=calls, total_ms=ms) for name, (calls, ms) in ranked]
    if not intervals:
        return kernels, None
    intervals.sort()
    busy, current_start, current_end = 0.0, *intervals[0]
    for start, end in intervals[1:]:
        if start > current_end:
            busy += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    busy += current_end - current_start
    span = current_end - intervals[0][0]
    return kernels, 1 - busy / span if span > 0 else None


def print_profile(result: dict) -> None:
    print(f"\nprofile: bs{result['batch_size']}, {result['profiled_steps']} decode steps, "
          f"{result['wall_ms_per_step']:.2f} ms/step wall (unprofiled)")
    split = result["host_ms_per_step"]
    print("host ms/step: " + ", ".join(f"{name} {ms:.3f}" for name, ms in split.items()))
    idle = result["gpu_idle_fraction"]
    print(f"GPU idle fraction (profiled run): {'-' if idle is None else f'{100 * idle:.1f}%'}")
    print(f"{'calls':>6} {'total ms':>9} {'ms/step':>8}  kernel")
    for kernel in result["top_kernels"]:
        print(f"{kernel['calls']:>6} {kernel['total_ms']:>9.2f} {kernel['total_ms'] / result['profiled_steps']:>8.3f}"
              f"  {kernel['name'][:110]}")

"""Where one OPD step's GPU time goes, plan step by plan step (``benchmarks/step.py --profile``).

step_timing.py's executor drains the device around every plan step, so a CUDA kernel runs inside the host window of
the plan step that launched it. One extra step runs under torch.profiler with each plan step in a
``record_function`` range; every device kernel is given to the range whose window holds its start, and summed by
kind (GEMM, attention, norms, ...). The table says, per plan step (rollout, teacher scoring, the micro-batch loop's
forward, loss and backward, the optimizer), how many milliseconds each kind of kernel took and which kernels weighed
most; the "idle" column is the plan step's wall time the GPU spent in no kernel. CPU runs have no device events and
print only the plan steps' wall times.
"""

from __future__ import annotations

import re

import torch

KINDS = (  # (kind, pattern over the kernel name); the first match wins (FlashAttention's names hold "cutlass")
    ("attention", r"flash|fmha|attention|split_kernel|merge_kernel"),
    ("gemm", r"nvjet|gemm|cutlass|xmma|splitKreduce|cublas"),
    ("divergence", r"divergence|log_softmax|logsumexp"),
    ("norm", r"rms|norm"),
    ("rope", r"rope|rotary"),
    ("activation", r"silu|swiglu|geglu|gelu|gated_activation"),
    ("sampler", r"race_|sampl"),
    ("optimizer", r"adam|foreach|multi_tensor"),
    ("copy", r"memcpy|memset|copy|cat|index"),
    ("elementwise", r"elementwise|vectorized|reduce"),
)


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if re.search(pattern, name, re.IGNORECASE)), "other")


class StepProfile:
    """The plan step ranges of one profiled OPD step and the kernels inside them."""

    def __init__(self):
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.profiler = profile(activities=activities)

    def __enter__(self):
        self.profiler.__enter__()
        return self

    def __exit__(self, *exc):
        self.profiler.__exit__(*exc)

    @staticmethod
    def range(step_name: str):
        return torch.profiler.record_function(f"plan_step:{step_name}")

    def summary(self, top: int = 4) -> dict:
        """{plan step: {wall_ms, kernel_ms, idle_ms, kinds: {kind: ms}, top: [(name, calls, ms)]}}."""
        events = list(self.profiler.events())
        ranges = [(event.name.split(":", 1)[1], event.time_range.start, event.time_range.end) for event in events
                  if event.device_type == torch.autograd.DeviceType.CPU and event.name.startswith("plan_step:")]
        steps: dict[str, dict] = {}
        for name, start, end in ranges:
            entry = steps.setdefault(name, {"wall_ms": 0.0, "kernel_ms": 0.0, "kinds": {}, "kernels": {}})
            entry["wall_ms"] += (end - start) / 1000
        for event in events:
            if event.device_type != torch.autograd.DeviceType.CUDA or event.name.startswith("plan_step:"):
                continue  # (a record_function range has a device-side twin: not a kernel)
            owner = next((name for name, start, end in ranges if start <= event.time_range.start < end), None)
            if owner is None:
                continue
            ms = (event.time_range.end - event.time_range.start) / 1000
            entry = steps[owner]
            entry["kernel_ms"] += ms
            kind = kind_of(event.name)
            entry["kinds"][kind] = entry["kinds"].get(kind, 0.0) + ms
            calls, total = entry["kernels"].get(event.name, (0, 0.0))
            entry["kernels"][event.name] = (calls + 1, total + ms)
        for entry in steps.values():
            entry["idle_ms"] = max(0.0, entry["wall_ms"] - entry["kernel_ms"])
            ranked = sorted(entry.pop("kernels").items(), key=lambda item: -item[1][1])[:top]
            entry["top"] = [(name, calls, ms) for name, (calls, ms) in ranked]
        return steps


def print_summary(label: str, steps: dict) -> None:
    kinds = [kind for kind, _ in KINDS] + ["other"]
    used = [kind for kind in kinds if any(kind in entry["kinds"] for entry in steps.values())]
    print(f"\nprofile of one step, {label}: ms per plan step, by kernel kind")
    print(f"{'plan step':<28}{'wall':>9}{'idle':>8}" + "".join(f"{kind[:10]:>11}" for kind in used))
    for name, entry in steps.items():
        print(f"{name[:28]:<28}{entry['wall_ms']:>9.1f}{entry['idle_ms']:>8.1f}"
              + "".join(f"{entry['kinds'].get(kind, 0.0):>11.1f}" for kind in used))
    for name, entry in steps.items():
        if entry["top"]:
            print(f"  {name}: " + "; ".join(f"{kernel[:60]} x{calls} {ms:.1f} ms" for kernel, calls, ms in entry["top"]))

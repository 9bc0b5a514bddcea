"""The roofline floor of benchmarks/step.py's step: the card's measured rates, and floor seconds per stage group.

measure_hardware measures the dense matmul FLOP/s (model dtype) and the device copy bandwidth on this card;
roofline turns them into the floor of one step of a shape (opdgraph.work): rollout = prefill FLOPs and, per decode
round, max(FLOPs / rate, (weights + KV read) / bandwidth); teacher = 2N FLOPs per token + attention; student = 6N per
token + 3x attention; loss = the lm_heads at response positions; optimizer = bytes of AdamW on fp32 masters.
"""

from __future__ import annotations

import time

import torch

import step_pipeline
from step_pipeline import StepShape
from step_timing import synchronize

NOMINAL_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense, SXM


def timed(function, device, repeats: int) -> float:
    function()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    synchronize(device)
    return (time.perf_counter() - started) / repeats


def measure_hardware(device: torch.device, tiny: bool) -> dict:
    """Measured dense matmul FLOP/s (model dtype) and device copy bandwidth (bytes read + written per second)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = 256 if tiny else 8192
    left, right = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    matmul_seconds = timed(lambda: left @ right, device, repeats=3 if tiny else 20)
    num_bytes = (16 if tiny else 2048) * 2**20
    source = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy_seconds = timed(lambda: target.copy_(source), device, repeats=3 if tiny else 10)
    del left, right, source, target
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    nominal = next((value for key, value in NOMINAL_BF16_TFLOPS.items() if key in name), None)
    return {"device": name, "torch": torch.__version__, "matmul_flops": 2 * size**3 / matmul_seconds,
            "copy_bytes_per_s": 2 * num_bytes / copy_seconds, "nominal_bf16_flops": nominal and nominal * 1e12}


def roofline(shape: StepShape, hardware: dict, *, tiny: bool, prefill_budget: int) -> dict:
    """Floor seconds and FLOPs per stage group for one step of `shape` at the measured rates."""
    from opdgraph import work
    from opdgraph.model_shapes import shape_from_hf_config

    # Looked up at call time: qwen35_gpu.run_step swaps step_pipeline.model_configs for its own pair.
    student_config, teacher_config = step_pipeline.model_configs(tiny)
    student, teacher = shape_from_hf_config(student_config), shape_from_hf_config(teacher_config)
    dtype_bytes = 4 if tiny else 2
    rate, bandwidth = hardware["matmul_flops"], hardware["copy_bytes_per_s"]
    hw = work.Hardware(matmul_tflops=rate / 1e12, memory_bandwidth_gbps=bandwidth / 1e9, pcie_gbps=25.0)
    length = shape.prompt_tokens + shape.response_tokens
    weight_bytes = student.parameter_count() * dtype_bytes
    kv_bytes = student.kv_bytes_per_token(dtype_bytes)
    rollout = (work.prefill_work(student, sequences=shape.sequences, prompt_tokens=shape.prompt_tokens,
                                 token_budget=prefill_budget, weight_bytes=weight_bytes, kv_bytes_per_token=kv_bytes,
                                 hardware=hw)
               + work.decode_work(student, sequences=shape.sequences, concurrent_seqs=shape.sequences,
                                  prompt_tokens=shape.prompt_tokens, new_tokens=shape.response_tokens,
                                  weight_bytes=weight_bytes, kv_bytes_per_token=kv_bytes, hardware=hw))
    positions = shape.sequences * shape.response_tokens
    flops = {"teacher": work.forward_flops(teacher, shape.tokens, length),
             "student_fwd": work.forward_flops(student, shape.tokens, length),
             "backward": 2 * work.forward_flops(student, shape.tokens, length),
             "loss": 2 * positions * student.vocab * (teacher.hidden + 3 * student.hidden)}
    floors = {name: value / rate for name, value in flops.items()}
    floors["rollout"] = rollout.seconds
    floors["optimizer"] = work.optimizer_work(student.parameter_count(), dtype_bytes, 4, hw).seconds  # fp32 sums
    flops["rollout"] = rollout.flops
    return {"floor_seconds": floors, "floor_step_seconds": sum(floors.values()), "flops": flops}

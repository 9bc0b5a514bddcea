"""Running Triton kernels (Liger-Kernel's and ours) in Triton's CPU interpreter (TRITON_INTERPRET=1), for CPU tests.

Three interpreter gaps (triton 3.9) that compiled code does not have, closed for the duration of a test:
- compiled Triton passes a python float argument as an fp32 scalar; the interpreter passes the python float, and
  kernels that call ``.to(tl.float32)`` on it (Liger's eps, offset, gate multiplier) fail, and scalar arithmetic
  such as ``1.0 - beta`` is done in double: floats are wrapped;
- libdevice functions imported by name (Liger's ``rsqrt``, ``tanh``) are stubs the interpreter does not patch: they
  are replaced in Liger's modules by the same functions written with ``tl.math.rsqrt`` and ``tl.sigmoid``;
- a launch leaves its arguments' storages in a reference cycle (the interpreter's host-copy bookkeeping), so the
  kernel's inputs and outputs stay allocated until Python's cyclic GC runs, which moves the peaks memory tests
  measure: each launch is followed by a young-generation collection (tens of microseconds).
``interpret_liger(monkeypatch)`` closes all three (``pass_floats_as_fp32(monkeypatch)`` the first alone); both do
nothing where kernels compile (a CUDA machine).

A fourth gap, closed by ``round_bf16_to_nearest(monkeypatch)`` (same scope): compiled ``x.to(tl.bfloat16)`` from fp32
rounds to nearest even, as torch does; the interpreter truncates the low mantissa bits, so a kernel that stores bf16
would differ from torch in about half its elements by one bf16 step.
"""

from __future__ import annotations

import gc
import os


def _tanh(x):
    import triton.language as tl

    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


def _rsqrt(x):
    import triton.language as tl

    return tl.math.rsqrt(x)


def pass_floats_as_fp32(monkeypatch) -> None:
    """The first gap alone: a python float argument becomes an fp32 scalar, so `1.0 - beta` rounds as compiled."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter._implicit_cvt

    def convert(arg):
        if isinstance(arg, float):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return original(arg)

    monkeypatch.setattr(interpreter, "_implicit_cvt", convert)


def interpret_liger(monkeypatch) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from liger_kernel.ops import fused_add_rms_norm, geglu, rms_norm
    from triton.runtime import interpreter

    pass_floats_as_fp32(monkeypatch)
    launch = interpreter.GridExecutor.__call__

    def launch_and_collect(self, *args, **kwargs):
        try:
            return launch(self, *args, **kwargs)
        finally:
            gc.collect(0)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", launch_and_collect)
    monkeypatch.setattr(rms_norm, "rsqrt", _rsqrt)
    monkeypatch.setattr(fused_add_rms_norm, "rsqrt", _rsqrt)
    monkeypatch.setattr(geglu, "tanh", _tanh)


def round_bf16_to_nearest(monkeypatch) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import torch
    import triton.language as tl
    from triton.runtime import interpreter

    truncate = interpreter.InterpreterBuilder.create_fp_trunc

    def convert(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(src.data).to(torch.bfloat16).view(torch.uint16).numpy()
            return interpreter.TensorHandle(rounded, tl.bfloat16)
        return truncate(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_fp_trunc", convert)


"""Running Liger-Kernel's Triton kernels in Triton's CPU interpreter (TRITON_INTERPRET=1), for CPU tests.

Two interpreter gaps (triton 3.x) that compiled code does not have, closed for the duration of a test:
- compiled Triton passes a python float argument as an fp32 scalar; the interpreter passes the python float, and
  kernels that call ``.to(tl.float32)`` on it (Liger's eps, offset, gate multiplier) fail: floats are wrapped;
- libdevice functions imported by name (Liger's ``rsqrt``, ``tanh``) are stubs the interpreter does not patch: they
  are replaced in Liger's modules by the same functions written with ``tl.math.rsqrt`` and ``tl.sigmoid``.
``interpret_liger(monkeypatch)`` does both; it does nothing where kernels compile (a CUDA machine).
"""

from __future__ import annotations

import os


def _tanh(x):
    import triton.language as tl

    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


def _rsqrt(x):
    import triton.language as tl

    return tl.math.rsqrt(x)


def interpret_liger(monkeypatch) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    import triton.language as tl
    from liger_kernel.ops import fused_add_rms_norm, geglu, rms_norm
    from triton.runtime import interpreter

    original = interpreter._implicit_cvt

    def convert(arg):
        if isinstance(arg, float):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return original(arg)

    monkeypatch.setattr(interpreter, "_implicit_cvt", convert)
    monkeypatch.setattr(rms_norm, "rsqrt", _rsqrt)
    monkeypatch.setattr(fused_add_rms_norm, "rsqrt", _rsqrt)
    monkeypatch.setattr(geglu, "tanh", _tanh)

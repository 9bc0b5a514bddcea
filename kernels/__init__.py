"""Triton kernels and flashinfer wrappers (installed as opdgraph.kernels); each family in its own module, its Triton
body imported lazily. `triton_imports()` is the one test of whether Triton can be used at all."""

from __future__ import annotations

import functools


@functools.cache
def triton_imports() -> bool:
    """Triton imports (installed is not enough: an install whose import raises anything counts as absent, and the
    callers fall back to their torch paths)."""
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True

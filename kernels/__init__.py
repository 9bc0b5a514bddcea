"""Triton kernels and flashinfer wrappers (installed as opdgraph.kernels); each family in its own module, its Triton
body imported lazily. `triton_imports()` is the one test of whether Triton can be used at all.

This directory is also importable as a top-level `kernels` whenever the repository root is on sys.path (`python -m
pytest` or `python -m opdgraph` run from it), where it would shadow Hugging Face's `kernels` package, which
transformers (5.2x) imports at startup. Imported under that name, this module hands the name over to the installed
package; where none is installed it stays what it is (transformers 5.1x probes `import kernels` and, finding no
version, counts it absent; a ModuleNotFoundError from here would escape that probe).
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import os
import sys


def _ours(origin: str | None) -> bool:
    """Whether a found `kernels/__init__.py` is an opdgraph checkout's (this one under another spelling of its path,
    a symlink, or another checkout or worktree): the folder itself holds our linear-attention wrapper (its parent
    would not do: an installed opdgraph sits beside Hugging Face's package in one site-packages)."""
    if origin is None:
        return False
    return os.path.isfile(os.path.join(os.path.dirname(os.path.realpath(origin)), "fla_linear_attention.py"))


def _hand_over_to_the_installed_kernels() -> None:
    """Load the first `kernels` on sys.path that is no opdgraph checkout's, if any, into sys.modules["kernels"]; the
    import system returns what sys.modules holds once this module's body ends. Entry by entry, so that no copy of
    this module is ever executed as `kernels` again (each would hand over to the next: an endless recursion)."""
    for entry in list(sys.path):
        spec = importlib.machinery.PathFinder.find_spec("kernels", [entry])
        if spec is None or spec.origin is None or spec.loader is None or _ours(spec.origin):  # None: a namespace
            continue
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module
        spec.loader.exec_module(module)
        return


if __name__ == "kernels":
    _hand_over_to_the_installed_kernels()


@functools.cache
def triton_imports() -> bool:
    """Triton imports (installed is not enough: an install whose import raises anything counts as absent, and the
    callers fall back to their torch paths)."""
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True

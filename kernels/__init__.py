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


def _hand_over_to_the_installed_kernels() -> None:
    """Load the `kernels` that sys.path holds outside this repository, if any, into sys.modules["kernels"]; the
    import system returns what sys.modules holds once this module's body ends."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    elsewhere = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    spec.loader.exec_module(module)


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

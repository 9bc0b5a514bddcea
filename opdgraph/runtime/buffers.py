"""The runtime's table of live plan buffers: the one place where tensors named by the plan are held and released.

Stages put what they produce under the plan's buffer name and take what they read from here; the executor releases
each buffer exactly at the plan's release point. Holding every planned tensor in one table is what makes the plan
the single source of truth for memory: once the table drops a buffer, nothing else should keep it alive. In debug
mode each release checks that with a weak reference (the object must really be gone) and, on CUDA, that the
allocator's count fell.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any


class BufferStillAliveError(RuntimeError):
    """A released buffer is still referenced somewhere: the plan's memory prediction would be wrong."""


def _weak_targets(value: Any) -> list[weakref.ref]:
    """Weak references to the tensors inside a buffer value (a tensor, or a list / tuple / dict of them)."""
    if isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    refs = []
    for item in items:
        try:
            refs.append(weakref.ref(item))
        except TypeError:  # ints, floats, None: nothing to track
            continue
    return refs


class BufferTable:
    """Named buffers alive right now, with release checks."""

    def __init__(self, *, debug: bool = False):
        self._values: dict[str, Any] = {}
        self.debug = debug
        self.released: list[str] = []

    def put(self, name: str, value: Any) -> None:
        self._values[name] = value

    def put_item(self, name: str, index: int, value: Any) -> None:
        """Per-micro-batch buffers hold one entry per micro-batch (all of them when the plan is unfused)."""
        self._values.setdefault(name, {})[index] = value

    def get_item(self, name: str, index: int) -> Any:
        return self.get(name)[index]

    def get(self, name: str) -> Any:
        if name not in self._values:
            raise KeyError(f"buffer {name!r} is not live (live: {sorted(self._values)})")
        return self._values[name]

    def has(self, name: str) -> bool:
        return name in self._values

    def live(self) -> list[str]:
        return sorted(self._values)

    def release(self, name: str) -> None:
        """Drop a buffer; in debug mode prove that nothing else holds it."""
        value = self._values.pop(name, None)
        self.released.append(name)
        if value is None or not self.debug:
            return
        refs = _weak_targets(value)
        del value
        if any(ref() is not None for ref in refs):
            gc.collect()  # only reference cycles survive plain refcounting; collecting is slow, so only when needed
        alive = [ref() for ref in refs if ref() is not None]
        if alive:
            raise BufferStillAliveError(
                f"buffer {name!r} was released by the plan but {len(alive)} of its tensors are still referenced "
                f"({[type(a).__name__ for a in alive]}); the plan's memory prediction no longer holds"
            )

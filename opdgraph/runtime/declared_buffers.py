"""The buffer table as one stage sees it while it runs: only the plan buffers its steps declare.

The executor hands every stage call this view instead of the whole table (opdgraph.runtime.executor). A stage that
reads or writes a buffer its plan steps do not list fails at once with `UndeclaredBufferError`, naming the stage,
the buffer and what it declares: the plan's reads and writes are what the lifetime analysis allocates and frees
by, so an access the plan does not know of would make its memory and its release points wrong. A stage's view
covers all of its steps (rollout's one `generate` call serves its prefill and decode steps).
"""

from __future__ import annotations

from typing import Any


class UndeclaredBufferError(RuntimeError):
    """A stage touched a buffer none of its plan steps reads or writes."""


class DeclaredBuffers:
    def __init__(self, table, stage: str, declared: frozenset[str]):
        self._table = table
        self._stage = stage
        self._declared = declared

    def _check(self, name: str) -> None:
        if name not in self._declared:
            raise UndeclaredBufferError(
                f"stage [{self._stage}] touched buffer {name!r}, which none of its plan steps reads or writes "
                f"(declared: {', '.join(sorted(self._declared))}); add it to the stage's plan_steps")

    def put(self, name: str, value: Any) -> None:
        self._check(name)
        self._table.put(name, value)

    def put_item(self, name: str, index: int, value: Any) -> None:
        self._check(name)
        self._table.put_item(name, index, value)

    def get(self, name: str) -> Any:
        self._check(name)
        return self._table.get(name)

    def get_item(self, name: str, index: int) -> Any:
        self._check(name)
        return self._table.get_item(name, index)

    def has(self, name: str) -> bool:
        self._check(name)
        return self._table.has(name)

    def __getattr__(self, name: str):  # live(), released, debug, release(): the table's own bookkeeping
        return getattr(self._table, name)


def declared_by_stage(plan) -> dict[str, frozenset[str]]:
    """stage -> every buffer its steps read or write."""
    declared: dict[str, set[str]] = {}
    for step in plan.steps:
        declared.setdefault(step.stage, set()).update(step.reads, step.writes, step.allocates)
    return {stage: frozenset(names) for stage, names in declared.items()}

"""Records of the data package: one usable prompt, one unusable row, and the loaded set with its summary.

The loader (``loader.py``) turns prompt files into a ``PromptSet``; the sampler (``sampler.py``) walks it in
shuffled, sharded steps; rollout reads ``PromptRecord.prompt_ids`` and eval scoring reads ``PromptRecord.answer``.
Rows that cannot be used become ``BadRow`` values: raised together in a ``PromptDataError`` by default, or
counted in the ``LoadSummary`` when the pipeline asks to skip them.
"""

from __future__ import annotations

from opdgraph.errors import OpdgraphError

from collections import Counter
from typing import Union

import attrs

# How many bad rows an error message or a summary lists before it says "... and N more".
MAX_LISTED_BAD_ROWS = 20
MAX_SUMMARY_BAD_ROWS = 5

Answer = Union[str, int, float, None]


class PromptDataError(OpdgraphError):
    """A prompt file (or a set of them) cannot be used; the message names every problem found."""


@attrs.frozen(kw_only=True)
class BadRow:
    """One row that cannot become a prompt: where it is, what class of problem, and the readable reason."""

    location: str = attrs.field()  # "path:line" for JSONL, "path:row N" for Parquet
    kind: str = attrs.field()  # short category used for counting, e.g. "invalid_json", "too_long"
    reason: str = attrs.field()  # full sentence for the user

    def __str__(self) -> str:
        return f"{self.location}: {self.reason}"


@attrs.frozen(kw_only=True)
class PromptRecord:
    """One usable prompt: its origin, the chat messages, their token ids, and an optional reference answer."""

    source: str = attrs.field()  # the prompt file path as given to the loader
    row: int = attrs.field()  # 1-based line for JSONL, 0-based row index for Parquet
    location: str = attrs.field()  # "path:line" / "path:row N", for messages that point back at the data
    messages: tuple[dict[str, str], ...] = attrs.field()  # [{"role", "content"}], ends with a user turn
    prompt_ids: tuple[int, ...] = attrs.field()  # chat-templated ids ending with the generation prompt
    answer: Answer = attrs.field(default=None)  # reference answer for eval scoring, as written in the file
    # teacher stage -> the ids of the prompt it sees, for teachers that see another prompt than the student's
    teacher_prompt_ids: dict[str, tuple[int, ...]] = attrs.field(factory=dict)
    route: str | None = attrs.field(default=None)  # the row's loss.route_field value (routed pipelines only)
    # hybrid SFT + OPD (opdgraph.data.gold_prefix): the gold solution's ids after prompt_ids, and how many of
    # prompt_ids' last ids are gold (set per step when the prefix is placed; 0 in the loaded set)
    gold_ids: tuple[int, ...] = attrs.field(default=())
    gold_prefix_length: int = attrs.field(default=0)


@attrs.frozen(kw_only=True)
class LoadSummary:
    """What loading did: how many prompts were kept, and how many rows were skipped for which reason."""

    num_loaded: int = attrs.field()
    num_skipped_by_kind: dict[str, int] = attrs.field(factory=dict)
    first_skipped: tuple[BadRow, ...] = attrs.field(default=())  # up to MAX_SUMMARY_BAD_ROWS examples

    @property
    def num_skipped(self) -> int:
        return sum(self.num_skipped_by_kind.values())

    @classmethod
    def from_rows(cls, num_loaded: int, skipped: list[BadRow]) -> "LoadSummary":
        counts = Counter(bad.kind for bad in skipped)
        return cls(
            num_loaded=num_loaded,
            num_skipped_by_kind=dict(sorted(counts.items())),
            first_skipped=tuple(skipped[:MAX_SUMMARY_BAD_ROWS]),
        )

    def describe(self) -> str:
        """One line when nothing was skipped; otherwise the counts by kind and the first few reasons."""
        if not self.num_skipped:
            return f"loaded {self.num_loaded} prompts"
        counts = ", ".join(f"{kind}: {count}" for kind, count in self.num_skipped_by_kind.items())
        lines = [f"loaded {self.num_loaded} prompts, skipped {self.num_skipped} bad rows ({counts})"]
        lines += [f"  {bad}" for bad in self.first_skipped]
        if self.num_skipped > len(self.first_skipped):
            lines.append(f"  ... and {self.num_skipped - len(self.first_skipped)} more")
        return "\n".join(lines)


@attrs.frozen(kw_only=True)
class PromptSet:
    """The prompts of one split (train or eval) in file order, plus the load summary."""

    records: tuple[PromptRecord, ...] = attrs.field()
    summary: LoadSummary = attrs.field()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> PromptRecord:
        return self.records[index]


def format_bad_rows(bad_rows: list[BadRow], header: str, limit: int = MAX_LISTED_BAD_ROWS) -> str:
    """A header line, then one line per bad row up to ``limit``, then a count of the rest."""
    lines = [header] + [f"  {bad}" for bad in bad_rows[:limit]]
    if len(bad_rows) > limit:
        lines.append(f"  ... and {len(bad_rows) - limit} more bad rows")
    return "\n".join(lines)

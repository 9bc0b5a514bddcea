"""Walk a ``PromptSet`` in steps: epoch-shuffled global order, one slice per step, sharded by rank, resumable.

The global order is the concatenation of epoch orders: epoch e is a permutation of the prompt indices drawn from
``random.Random(mix_seed("epoch", seed, e))`` (identity when ``shuffle`` is off). Step k takes the next
``prompts_per_step`` entries of that order, crossing epoch boundaries without a gap or a short batch; every rank
computes the same global slice and keeps its contiguous share (rank r gets entries r*n .. r*n + n - 1 with
n = prompts_per_step / world_size). The global order does not depend on world_size, so a run can resume on a
different number of ranks and still see the same prompts.

The checkpointable state is ``{"epoch", "position", "num_prompts"}``: the next step starts at entry ``position``
of epoch ``epoch``; ``num_prompts`` guards against resuming with a different prompt set.

``sample_seed`` derives the per-sample seed for rollout from the pipeline seed, the step, and the prompt's index
in the step's global batch (not its rank-local index), so sampling does not change with the world size.
All of this is torch-free and stable across processes, platforms and Python versions (SHA-256 based mixing).
"""

from __future__ import annotations

import hashlib
import random

import attrs

from opdgraph.data.records import PromptRecord, PromptSet


def mix_seed(purpose: str, *numbers: int) -> int:
    """A 63-bit integer from SHA-256 of "opdgraph:<purpose>:<n1>:<n2>...": stable, independent per purpose."""
    text = ":".join(["opdgraph", purpose, *(str(int(number)) for number in numbers)])
    digest = hashlib.sha256(text.encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # 63 bits: fits a signed int64 and torch.manual_seed


def sample_seed(pipeline_seed: int, step: int, global_prompt_index: int) -> int:
    """The rollout seed for one prompt of one step.

    ``global_prompt_index`` is the prompt's position in the step's global batch (``SampledPrompt.index_in_step``,
    0 .. prompts_per_step - 1), so the seed is the same whichever rank handles the prompt. Defined as the first 8
    bytes (big-endian) of SHA-256 of ``"opdgraph:sample:<pipeline_seed>:<step>:<global_prompt_index>"``, shifted
    right by one bit; a value in [0, 2**63).
    """
    return mix_seed("sample", pipeline_seed, step, global_prompt_index)


def epoch_order(num_prompts: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The prompt indices of one epoch, in the order they are used."""
    order = list(range(num_prompts))
    if shuffle:
        random.Random(mix_seed("epoch", seed, epoch)).shuffle(order)
    return order


@attrs.frozen(kw_only=True)
class SampledPrompt:
    """One prompt handed to this rank for one step, with the indices rollout needs for seeding and logging."""

    record: PromptRecord = attrs.field()
    prompt_index: int = attrs.field()  # index into the PromptSet
    index_in_step: int = attrs.field()  # position in the step's global batch (0 .. prompts_per_step - 1)
    epoch: int = attrs.field()


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class PromptSampler:
    """Deterministic, resumable source of per-step prompt batches for one rank."""

    def __init__(self, prompt_set: PromptSet, *, prompts_per_step: int, seed: int, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        if len(prompt_set) == 0:
            raise ValueError("cannot sample from an empty prompt set")
        _positive_int("prompts_per_step", prompts_per_step)
        _positive_int("world_size", world_size)
        if prompts_per_step % world_size:
            raise ValueError(
                f"prompts_per_step = {prompts_per_step} is not divisible by world_size = {world_size}; every rank "
                "must get the same number of prompts, so choose a multiple of the number of ranks"
            )
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
        self.prompt_set = prompt_set
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0
        self._order_epoch = -1
        self._order: list[int] = []

    def repeat_note(self) -> str | None:
        """The note a run prints at its start when every step must hold some prompts more than once, because the
        data has fewer prompts than a step draws (prompts_per_step counts all ranks together); None otherwise."""
        available, drawn = len(self.prompt_set), self.prompts_per_step
        if available >= drawn:
            return None
        return (f"note: the training data holds {available} prompt(s) but every step draws prompts_per_step = "
                f"{drawn}, so each step repeats prompts (each about {drawn / available:.1f} times, not a sample of "
                f"distinct prompts); add prompts or lower data.prompts_per_step to at most {available}")

    @property
    def prompts_per_rank(self) -> int:
        return self.prompts_per_step // self.world_size

    def _order_of(self, epoch: int) -> list[int]:
        if epoch != self._order_epoch:  # only the current epoch's permutation is kept
            self._order = epoch_order(len(self.prompt_set), self.seed, epoch, self.shuffle)
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> list[SampledPrompt]:
        """This rank's prompts for the next step; advances the state past the whole global step."""
        first = self.rank * self.prompts_per_rank
        last = first + self.prompts_per_rank
        batch = []
        for index_in_step in range(self.prompts_per_step):
            if first <= index_in_step < last:
                prompt_index = self._order_of(self.epoch)[self.position]
                batch.append(SampledPrompt(record=self.prompt_set[prompt_index], prompt_index=prompt_index,
                                           index_in_step=index_in_step, epoch=self.epoch))
            self.position += 1
            if self.position == len(self.prompt_set):
                self.epoch, self.position = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "num_prompts": len(self.prompt_set)}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state saved by ``state_dict``; the following batches continue the saved sequence exactly."""
        expected = {"epoch", "position", "num_prompts"}
        if set(state) != expected:
            raise ValueError(f"sampler state must have keys {sorted(expected)}, got {sorted(state)}")
        if state["num_prompts"] != len(self.prompt_set):
            raise ValueError(
                f"sampler state was saved with {state['num_prompts']} prompts but the prompt set now has "
                f"{len(self.prompt_set)}; resuming would not continue the same sequence (restore the original "
                "prompt files, or start a fresh run)"
            )
        epoch, position = state["epoch"], state["position"]
        if not (isinstance(epoch, int) and epoch >= 0 and isinstance(position, int)
                and 0 <= position < len(self.prompt_set)):
            raise ValueError(f"sampler state has an invalid epoch/position: {state}")
        self.epoch, self.position = epoch, position

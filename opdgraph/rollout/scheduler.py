"""Continuous-batching scheduler: decides, each step, which tokens of which sequences the next forward computes.

Pure python over sequences and page ids (no tensors), so it can be tested and reasoned about on its own; the batch
builder turns its output into model inputs, and ``update`` applies the sampled tokens afterwards.

One step, in order:
1. Running sequences, oldest first: a decoding sequence always feeds its one pending token (all decodes share the
   forward); a sequence still prefilling takes a chunk of at most what is left of ``prefill_token_budget``.
2. If the pool cannot supply the pages this needs (new pages + copy-on-write copies), preempt the longest running
   sequence (most tokens; the most recently admitted among equals) and plan again, until it fits. A preempted
   sequence releases its pages and waits to be re-prefilled.
3. If nothing was preempted, admit waiting sequences, shortest (prompt + generated) first, while a sequence slot is
   free (a request's n samples take n slots from the start) and the pool has room for the whole context (beyond
   what running prefills still need); each admitted sequence takes a prefill chunk from the remaining budget.

Copy-on-write: the n samples of a prompt share its pages; full pages are never written again, and the shared last
partial page is copied for each sample that appends to it while someone else still holds it (the last holder writes
in place). The copies are listed in the step's output and must run before the forward.

Models with linear-attention layers (Qwen3.5) also need a recurrent-state slot per running sequence (state_slots.py):
taken with the first chunk, given back on finish and preemption; a fork gives the new samples slots and lists the
copies of the prompt's state in ``state_copies``, which the engine makes right after ``update``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from opdgraph.rollout.kv_pool import PagePool
from opdgraph.rollout.sequence import Sequence
from opdgraph.rollout.state_slots import StateSlotPool


@dataclass
class ScheduledChunk:
    """Tokens [start, start + num_tokens) of ``sequence`` are fed to this forward."""

    sequence: Sequence
    start: int
    num_tokens: int
    is_decode: bool
    samples: bool  # reaches the sequence's last token: its last row's logits choose the next token(s)


@dataclass
class ScheduledBatch:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    page_copies: list[tuple[int, int]] = field(default_factory=list)  # (source page, destination page)
    # > 0 for a decode burst (``schedule_burst``): up to this many decode steps run on the device back to back;
    # chunk.num_tokens is then how many of them each sequence may take (its pages cover them).
    burst_steps: int = 0

    @property
    def sampling_chunks(self) -> list[ScheduledChunk]:
        return [chunk for chunk in self.chunks if chunk.samples]


class Scheduler:
    def __init__(self, pool: PagePool, *, page_size: int, max_num_seqs: int, prefill_token_budget: int,
                 state_slots: StateSlotPool | None = None):
        self.pool = pool
        self.state_slots = state_slots
        self.state_copies: list[tuple[int, int]] = []  # (source slot, destination slot), made after update()
        self.page_size = page_size
        self.max_num_seqs = max_num_seqs
        self.prefill_token_budget = prefill_token_budget
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.finished: list[Sequence] = []
        self.num_preemptions = 0
        self._admissions = 0

    def add(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def live_page_tables(self) -> list[list[int]]:
        return [sequence.pages for sequence in self.running + self.waiting]

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    # ----------------------------------------------------------------------------------------------- scheduling
    def schedule(self) -> ScheduledBatch:
        preempted = False
        while True:
            plan, budget_left = self._plan_running()
            if self._pages_needed(plan) <= self.pool.num_free:
                break
            victim = max(self.running, key=lambda s: (s.num_tokens, s.admission_order))
            self._preempt(victim)
            preempted = True

        batch = ScheduledBatch()
        for sequence, num_tokens in plan:
            self._append_chunk(batch, sequence, num_tokens)
        if not preempted:
            self._admit(batch, budget_left)
        return batch

    def schedule_burst(self, max_steps: int) -> ScheduledBatch | None:
        """A decode burst: every running sequence decodes up to ``steps`` tokens in a row without host involvement.

        Only when all running sequences are decoding and nobody could be admitted now (admission would otherwise
        wait for the burst to end). ``steps`` is ``max_steps``, halved until the pool holds every sequence's pages
        for them (a burst never preempts: at one step the normal schedule() handles a full pool). Each sequence
        takes min(steps, tokens it may still generate); the host truncates at EOS / stop tokens afterwards
        (``update_burst``), and tokens computed past them are dropped. None when no burst is possible.
        """
        if not self.running or not all(sequence.is_decode for sequence in self.running) or self._could_admit():
            return None
        steps = max_steps
        while True:
            plan = [(sequence, min(steps, sequence.request.params.max_new_tokens - len(sequence.generated)))
                    for sequence in self.running]
            if self._pages_needed(plan) <= self.pool.num_free:
                break
            if steps == 1:
                return None
            steps //= 2
        batch = ScheduledBatch(burst_steps=max(num_tokens for _, num_tokens in plan))
        for sequence, num_tokens in plan:
            self._append_chunk(batch, sequence, num_tokens)
            batch.chunks[-1].is_decode = batch.chunks[-1].samples = True
        return batch

    def _could_admit(self) -> bool:
        """Whether the next schedule() would admit the first waiting sequence: a slot is free and, after the running
        decodes take the pages of their next token, so are its context's pages (what _admit checks)."""
        if not self.waiting:
            return False
        first = min(self.waiting, key=lambda s: (s.num_tokens, s.arrival_order))
        slots_used = sum(len(s.sample_indices) for s in self.running)
        decode_pages = self._pages_needed([(sequence, 1) for sequence in self.running])
        return (slots_used + len(first.sample_indices) <= self.max_num_seqs
                and self.pages_for(first.num_tokens) <= self.pool.num_free - decode_pages)

    def _plan_running(self) -> tuple[list[tuple[Sequence, int]], int]:
        plan = []
        budget_left = self.prefill_token_budget
        for sequence in self.running:
            if sequence.is_decode:
                plan.append((sequence, 1))
                continue
            num_tokens = min(sequence.num_uncached, budget_left)
            if num_tokens > 0:
                plan.append((sequence, num_tokens))
                budget_left -= num_tokens
        return plan, budget_left

    def _pages_needed(self, plan: list[tuple[Sequence, int]]) -> int:
        needed = 0
        writers_of_shared_page: Counter[int] = Counter()
        for sequence, num_tokens in plan:
            start = sequence.num_cached
            needed += max(0, self.pages_for(start + num_tokens) - len(sequence.pages))
            first_page_index = start // self.page_size
            if first_page_index < len(sequence.pages) and self.pool.is_shared(sequence.pages[first_page_index]):
                writers_of_shared_page[sequence.pages[first_page_index]] += 1
        # A page held by r sequences and written by w of them needs min(w, r - 1) copies: the last holder to
        # write (if all r write) keeps the original.
        for page, writers in writers_of_shared_page.items():
            needed += min(writers, self.pool.refcounts[page] - 1)
        return needed

    def _append_chunk(self, batch: ScheduledBatch, sequence: Sequence, num_tokens: int) -> None:
        # Runs once per sequence per step: plain arithmetic instead of the Sequence properties keeps it cheap.
        start = sequence.num_cached
        if self.state_slots is not None and sequence.state_slot < 0:
            sequence.state_slot = self.state_slots.allocate()
        pages = sequence.pages
        page_size = self.page_size
        first_page_index = start // page_size
        if first_page_index < len(pages) and self.pool.refcounts[pages[first_page_index]] > 1:
            shared_page = pages[first_page_index]
            own_copy = self.pool.allocate()
            batch.page_copies.append((shared_page, own_copy))
            self.pool.release(shared_page)
            pages[first_page_index] = own_copy
            sequence.pages_version += 1
        pages_wanted = -(-(start + num_tokens) // page_size)
        while len(pages) < pages_wanted:
            pages.append(self.pool.allocate())
            sequence.pages_version += 1
        total_tokens = len(sequence.request.prompt_ids) + len(sequence.generated)
        is_decode = total_tokens - start == 1 and len(sequence.generated) > 0  # == sequence.is_decode
        batch.chunks.append(ScheduledChunk(sequence, start, num_tokens, is_decode=is_decode,
                                           samples=start + num_tokens == total_tokens))

    def _admit(self, batch: ScheduledBatch, budget_left: int) -> None:
        if not self.waiting:
            return
        self.waiting.sort(key=lambda s: (s.num_tokens, s.arrival_order))
        num_slots_used = sum(len(s.sample_indices) for s in self.running)  # a group holds n slots
        # Pages the running prefills will still need for their contexts: admitting into them would only cause
        # preemptions later.
        pages_promised = sum(max(0, self.pages_for(s.num_tokens) - len(s.pages)) for s in self.running)
        while self.waiting and budget_left > 0:
            sequence = self.waiting[0]
            if num_slots_used + len(sequence.sample_indices) > self.max_num_seqs:
                break
            context_pages = self.pages_for(sequence.num_tokens)
            if context_pages > self.pool.num_free - pages_promised:
                break
            self.waiting.pop(0)
            sequence.admission_order = self._admissions
            self._admissions += 1
            self.running.append(sequence)
            num_slots_used += len(sequence.sample_indices)
            num_tokens = min(sequence.num_uncached, budget_left)
            budget_left -= num_tokens
            self._append_chunk(batch, sequence, num_tokens)
            pages_promised += context_pages - len(sequence.pages)

    def _release_state_slot(self, sequence: Sequence) -> None:
        if sequence.state_slot >= 0:
            self.state_slots.release(sequence.state_slot)
            sequence.state_slot = -1

    def _preempt(self, sequence: Sequence) -> None:
        self._release_state_slot(sequence)
        for page in sequence.pages:
            self.pool.release(page)
        sequence.pages = []
        sequence.pages_version += 1
        sequence.num_recomputed_tokens += sequence.num_cached
        sequence.num_cached = 0
        sequence.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(sequence)
        self.waiting.append(sequence)

    # --------------------------------------------------------------------------------------------- after forward
    def update(self, batch: ScheduledBatch, tokens: list[int], logprobs: list[float]) -> None:
        """Advance the cache of every chunk and append the sampled tokens (one per sample row, in batch order)."""
        for chunk in batch.chunks:
            chunk.sequence.num_cached += chunk.num_tokens
        row = 0
        for chunk in batch.sampling_chunks:
            sequence = chunk.sequence
            num_samples = len(sequence.sample_indices)
            samples = [sequence]
            if num_samples > 1:
                samples = sequence.fork()
                for page in sequence.pages:
                    for _ in range(num_samples - 1):
                        self.pool.share(page)
                if sequence.state_slot >= 0:  # the first sample keeps the prompt's state, the others copy it
                    samples[0].state_slot = sequence.state_slot
                    for sample in samples[1:]:
                        sample.state_slot = self.state_slots.allocate()
                        self.state_copies.append((sequence.state_slot, sample.state_slot))
                position = self.running.index(sequence)
                self.running[position : position + 1] = samples
            for sample in samples:
                self._append_token(sample, tokens[row], logprobs[row])
                row += 1
        assert row == len(tokens), f"{len(tokens)} sampled tokens for {row} sample rows"

    def update_burst(self, batch: ScheduledBatch, tokens: list[list[int]], logprobs: list[list[float]]) -> None:
        """Apply a burst's tokens: tokens[t][i] is what sequence i (batch order) sampled at burst step t. Each
        sequence takes its tokens in order until it finishes or its share (chunk.num_tokens) is used."""
        for row, chunk in enumerate(batch.chunks):
            sequence = chunk.sequence
            for step in range(chunk.num_tokens):
                sequence.num_cached += 1  # the token fed at this step now sits in the cache
                self._append_token(sequence, tokens[step][row], logprobs[step][row])
                if sequence.finish_reason is not None:
                    break

    def _append_token(self, sequence: Sequence, token: int, logprob: float) -> None:
        sequence.generated.append(token)
        sequence.logprobs.append(logprob)
        params = sequence.request.params
        if token in params.eos_token_ids:
            sequence.finish_reason = "eos"
        elif token in params.stop_token_ids:
            sequence.finish_reason = "stop"
        elif len(sequence.generated) >= params.max_new_tokens:
            sequence.finish_reason = "length"
        else:
            return
        self._release_state_slot(sequence)
        for page in sequence.pages:
            self.pool.release(page)
        sequence.pages = []
        sequence.pages_version += 1
        self.running.remove(sequence)
        self.finished.append(sequence)

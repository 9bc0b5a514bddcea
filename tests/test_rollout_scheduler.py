"""Scheduler and page-accounting tests, without a model: tiny schedules as tables, plus randomized runs.

Every schedule is checked by ``check_page_accounting`` (no page leaked or double-freed, refcounts equal holders,
free + used = total) and, in the randomized runs, by a fake KV store that records which token each cache slot holds:
after the step's copy-on-write copies and writes, every scheduled sequence must read back exactly its own tokens
through its page table. That catches sharing and copy-on-write mistakes that accounting alone cannot see.
"""

from __future__ import annotations

import random

import pytest
import torch
from rollout_toy_model import ToyDecoderLM

from opdgraph.rollout import Request, RolloutEngine, SamplingParams
from opdgraph.rollout.kv_pool import PagePool, check_page_accounting
from opdgraph.rollout.scheduler import Scheduler
from opdgraph.rollout.sequence import Sequence


def make_scheduler(*, page_size, num_pages, max_num_seqs=8, budget=64):
    pool = PagePool(num_pages)
    return Scheduler(pool, page_size=page_size, max_num_seqs=max_num_seqs, prefill_token_budget=budget)


def add(scheduler, prompt_len, *, n=1, max_new=10, eos=(), order=None):
    params = SamplingParams(max_new_tokens=max_new, eos_token_ids=eos)
    order = len(scheduler.waiting) + len(scheduler.running) if order is None else order
    request = Request(f"r{order}", list(range(1, prompt_len + 1)), params, n=n)
    sequence = Sequence(request, sample_indices=list(range(n)), arrival_order=order)
    scheduler.add(sequence)
    return sequence


def step(scheduler, token=1):
    batch = scheduler.schedule()
    check_page_accounting(scheduler.pool, scheduler.live_page_tables())
    num_rows = sum(len(chunk.sequence.sample_indices) for chunk in batch.sampling_chunks)
    scheduler.update(batch, [token] * num_rows, [0.0] * num_rows)
    check_page_accounting(scheduler.pool, scheduler.live_page_tables())
    return batch


def test_copy_on_write_of_the_shared_partial_page():
    """n samples must share the prompt's pages; each but the last writer copies the partial page (and only it)."""
    scheduler = make_scheduler(page_size=4, num_pages=10)
    add(scheduler, prompt_len=5, n=3)
    first = step(scheduler)
    assert [(c.start, c.num_tokens) for c in first.chunks] == [(0, 5)] and scheduler.pool.num_used == 2
    full_page, partial_page = scheduler.running[0].pages
    assert len(scheduler.running) == 3 and scheduler.pool.refcounts[full_page] == 3
    second = step(scheduler)
    assert len(second.page_copies) == 2 and all(source == partial_page for source, _ in second.page_copies)
    assert scheduler.pool.num_used == 4  # 1 shared full page + 3 partial pages
    assert [s.pages[0] for s in scheduler.running] == [full_page] * 3
    assert sorted(s.pages[1] for s in scheduler.running) == sorted([partial_page] + [d for _, d in second.page_copies])


def test_prompt_of_whole_pages_needs_no_copy():
    """When the prompt fills its pages exactly, each sample's first decode must open a fresh page, no copy."""
    scheduler = make_scheduler(page_size=4, num_pages=10)
    add(scheduler, prompt_len=8, n=2)
    step(scheduler)
    second = step(scheduler)
    assert second.page_copies == [] and scheduler.pool.num_used == 4


def test_preemption_evicts_the_longest_and_admits_nothing_that_step():
    """When the pool runs dry the longest running sequence must give its pages back and wait for re-prefill."""
    scheduler = make_scheduler(page_size=2, num_pages=5)
    short = add(scheduler, prompt_len=3)  # 2 pages
    long = add(scheduler, prompt_len=5)  # 3 pages
    step(scheduler)  # both prefilled, pool full, both sampled one token
    step(scheduler)  # positions 3 and 5 still fit in their last pages
    assert scheduler.pool.num_free == 0
    third = step(scheduler)  # both need a page: the longer one (7 tokens vs 5) is evicted
    assert [c.sequence for c in third.chunks] == [short]
    assert long in scheduler.waiting and long.pages == [] and long.num_cached == 0
    assert long.num_preemptions == 1 and long.num_recomputed_tokens == 6 and scheduler.num_preemptions == 1
    assert long.generated == [1, 1]  # what it generated is kept for the re-prefill


def test_admission_is_shortest_first_within_slots_and_pool():
    """Waiting sequences must be admitted shortest first, while sequence slots (n per request) and pages allow."""
    scheduler = make_scheduler(page_size=4, num_pages=4, max_num_seqs=3)
    six, two, four, group = add(scheduler, 6), add(scheduler, 2), add(scheduler, 4), add(scheduler, 1, n=2)
    batch = scheduler.schedule()
    # Shortest first: group (1 token, 2 slots) then two (2 tokens, 1 slot); four would need a 4th slot.
    assert [c.sequence for c in batch.chunks] == [group, two] and scheduler.waiting == [four, six]
    scheduler = make_scheduler(page_size=4, num_pages=3, max_num_seqs=8)
    nine, three = add(scheduler, 9), add(scheduler, 3)
    batch = scheduler.schedule()
    # After three (1 page), nine would need 3 more pages of the 2 left: it waits.
    assert [c.sequence for c in batch.chunks] == [three] and scheduler.waiting == [nine]


def test_long_prompt_prefills_in_budgeted_chunks_while_others_decode():
    """Chunked prefill must spread a prompt over forwards within the budget, without stalling running decodes."""
    scheduler = make_scheduler(page_size=4, num_pages=20, budget=4)
    decoder = add(scheduler, prompt_len=2, max_new=20)
    step(scheduler)
    long = add(scheduler, prompt_len=10)
    chunks = []
    for _ in range(3):
        batch = step(scheduler)
        chunks.append([(c.sequence is long, c.start, c.num_tokens, c.samples) for c in batch.chunks])
    assert chunks == [
        [(False, 2, 1, True), (True, 0, 4, False)],
        [(False, 3, 1, True), (True, 4, 4, False)],
        [(False, 4, 1, True), (True, 8, 2, True)],
    ]
    assert len(long.generated) == 1 and len(decoder.generated) == 4


def test_random_schedules_keep_pages_and_cache_contents_consistent():
    """Any mix of finish / preempt / resume / fork must keep accounting exact and every cache read correct."""
    totals = [run_random_schedule(seed) for seed in range(12)]
    assert sum(preemptions for preemptions, _ in totals) > 0, "the random runs never preempted"
    assert sum(copies for _, copies in totals) > 0, "the random runs never copied a shared page"


def run_random_schedule(seed):
    """Drive a random workload to completion with random tokens (0 = EOS); return (preemptions, page copies)."""
    rng = random.Random(seed)
    page_size = rng.choice([1, 2, 3, 4])
    scheduler = make_scheduler(page_size=page_size, num_pages=rng.randint(8, 16), max_num_seqs=rng.randint(3, 6),
                               budget=rng.randint(1, 8))
    sequences = []
    for order in range(rng.randint(4, 9)):
        max_new = rng.randint(1, 6)
        prompt_len = rng.randint(1, scheduler.pool.num_pages * page_size - max_new + 1)
        sequences.append(add(scheduler, prompt_len, n=rng.randint(1, 3), max_new=max_new, eos=(0,), order=order))
    slot_tokens: dict[int, int] = {}  # fake KV cache: which token each slot holds
    num_steps = num_copies = 0
    while scheduler.has_work():
        batch = scheduler.schedule()
        num_copies += len(batch.page_copies)
        check_page_accounting(scheduler.pool, scheduler.live_page_tables())
        assert sum(len(s.sample_indices) for s in scheduler.running) <= scheduler.max_num_seqs
        assert sum(c.num_tokens for c in batch.chunks if not c.is_decode) <= scheduler.prefill_token_budget
        assert len({id(c.sequence) for c in batch.chunks}) == len(batch.chunks)
        for source, destination in batch.page_copies:
            for offset in range(page_size):
                if source * page_size + offset in slot_tokens:
                    slot_tokens[destination * page_size + offset] = slot_tokens[source * page_size + offset]
        for chunk in batch.chunks:
            sequence, stop = chunk.sequence, chunk.start + chunk.num_tokens
            for position, token in zip(range(chunk.start, stop), sequence.tokens(chunk.start, stop)):
                slot_tokens[sequence.pages[position // page_size] * page_size + position % page_size] = token
        for chunk in batch.chunks:
            sequence, stop = chunk.sequence, chunk.start + chunk.num_tokens
            assert len(sequence.pages) == -(-stop // page_size)
            read = [slot_tokens[sequence.pages[p // page_size] * page_size + p % page_size] for p in range(stop)]
            assert read == sequence.tokens(0, stop)
        num_rows = sum(len(c.sequence.sample_indices) for c in batch.sampling_chunks)
        scheduler.update(batch, [rng.randint(0, 4) for _ in range(num_rows)], [0.0] * num_rows)
        check_page_accounting(scheduler.pool, scheduler.live_page_tables())
        num_steps += 1
        assert num_steps < 10_000, "scheduler stopped making progress"
    assert scheduler.pool.num_free == scheduler.pool.num_pages
    assert len(scheduler.finished) == sum(s.request.n for s in sequences)
    for finished in scheduler.finished:
        params = finished.request.params
        assert 1 <= len(finished.generated) <= params.max_new_tokens
        assert (finished.finish_reason == "eos") == (finished.generated[-1] == 0)
        assert 0 not in finished.generated[:-1]
    return scheduler.num_preemptions, num_copies


def test_engine_keeps_page_accounting_after_every_step():
    """The engine's own steps (forks, copy-on-write, preemption, finishes) must keep the pool exact throughout."""
    checked = []

    class CheckedEngine(RolloutEngine):
        def _step(self, scheduler, stats):
            super()._step(scheduler, stats)
            check_page_accounting(scheduler.pool, scheduler.live_page_tables())
            checked.append(scheduler.pool.num_used)

    engine = CheckedEngine(ToyDecoderLM(seed=1), page_size=2, num_pages=10, max_num_seqs=4, prefill_token_budget=3,
                           device="cpu")
    params = SamplingParams(max_new_tokens=6, temperature=1.2, eos_token_ids=(3, 4, 5))
    prompts = [[1, 2, 3], [9] * 7, [4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4], [6]]
    with torch.inference_mode():
        engine.generate([Request(f"r{i}", p, params, n=2, seed=i) for i, p in enumerate(prompts)])
    assert engine.stats.preemptions > 0 and len(checked) == engine.stats.forwards and checked[-1] == 0


def test_check_page_accounting_detects_leaks_and_double_frees():
    """The checker itself must fail on a leaked page, a double free and a wrong refcount."""
    pool = PagePool(4)
    a, b = pool.allocate(), pool.allocate()
    pool.share(a)
    check_page_accounting(pool, [[a, b], [a]])
    with pytest.raises(AssertionError, match="refcount"):
        check_page_accounting(pool, [[a, b]])  # a is leaked: refcount 2, one holder
    pool.release(b)
    pool.free_pages.append(b)  # simulate a double free
    with pytest.raises(AssertionError, match="double free"):
        check_page_accounting(pool, [[a], [a]])


def test_burst_goes_ahead_when_admission_would_fail_after_the_decodes_take_their_pages():
    """A waiting sequence whose context fits the free pages only before the running decodes take the page of their
    next token cannot be admitted by schedule(); schedule_burst must not wait for it (it used to, and fell back to
    one step at a time), and must agree with what schedule() then does."""
    scheduler = make_scheduler(page_size=4, num_pages=4, budget=64)
    add(scheduler, prompt_len=4, max_new=10)  # one full page; its first decode token needs a second page
    step(scheduler)  # prefill: 1 page used, the running sequence now decodes
    add(scheduler, prompt_len=12, max_new=2)  # a 3-page context: fits the 3 free pages, not the 2 left after decode
    burst = scheduler.schedule_burst(2)
    assert burst is not None and burst.burst_steps >= 1
    check_page_accounting(scheduler.pool, scheduler.live_page_tables())

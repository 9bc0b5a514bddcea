"""Tests for opdgraph.data.sampler: deterministic epoch shuffling, epoch crossing, rank sharding, resumable state."""

from __future__ import annotations

import hashlib
import json

import pytest

from opdgraph.data import LoadSummary, PromptRecord, PromptSampler, PromptSet, sample_seed


def make_prompt_set(num_prompts: int) -> PromptSet:
    records = tuple(
        PromptRecord(source="mem.jsonl", row=index + 1, location=f"mem.jsonl:{index + 1}",
                     messages=({"role": "user", "content": f"p{index}"},), prompt_ids=(index,))
        for index in range(num_prompts))
    return PromptSet(records=records, summary=LoadSummary(num_loaded=num_prompts))


def prompt_indices(sampler: PromptSampler, num_steps: int) -> list[list[int]]:
    return [[sample.prompt_index for sample in sampler.next_batch()] for _ in range(num_steps)]


def test_shuffle_is_deterministic_per_seed_and_differs_between_epochs():
    """The same seed must replay the same order (reproducible runs); another seed or the next epoch must give a
    different permutation (otherwise every epoch would repeat the same batches)."""
    prompt_set = make_prompt_set(24)
    first = prompt_indices(PromptSampler(prompt_set, prompts_per_step=24, seed=7), 2)
    again = prompt_indices(PromptSampler(prompt_set, prompts_per_step=24, seed=7), 2)
    other_seed = prompt_indices(PromptSampler(prompt_set, prompts_per_step=24, seed=8), 1)
    assert first == again
    assert sorted(first[0]) == sorted(first[1]) == list(range(24))
    assert first[0] != first[1]
    assert first[0] != other_seed[0]
    assert first[0] != list(range(24))


def test_no_shuffle_keeps_file_order():
    """With shuffle off, prompts must come in file order epoch after epoch."""
    sampler = PromptSampler(make_prompt_set(5), prompts_per_step=3, seed=1, shuffle=False)
    assert prompt_indices(sampler, 3) == [[0, 1, 2], [3, 4, 0], [1, 2, 3]]


def test_steps_cross_epoch_boundaries_seamlessly():
    """Concatenated batches must equal epoch 0's order followed by epoch 1's, with a batch spanning the boundary
    (no short batch, no skipped prompts) and each sample tagged with its epoch."""
    prompt_set = make_prompt_set(10)
    full_epochs = prompt_indices(PromptSampler(prompt_set, prompts_per_step=10, seed=3), 2)
    sampler = PromptSampler(prompt_set, prompts_per_step=4, seed=3)
    batches = [sampler.next_batch() for _ in range(5)]
    assert [sample.prompt_index for batch in batches for sample in batch] == full_epochs[0] + full_epochs[1]
    assert [sample.epoch for sample in batches[2]] == [0, 0, 1, 1]
    assert [sample.index_in_step for sample in batches[2]] == [0, 1, 2, 3]
    assert sampler.state_dict() == {"epoch": 2, "position": 0, "num_prompts": 10}


def test_step_larger_than_the_prompt_set():
    """A step bigger than the whole set must still be filled, spanning several epochs."""
    sampler = PromptSampler(make_prompt_set(3), prompts_per_step=8, seed=0)
    batch = sampler.next_batch()
    assert len(batch) == 8
    assert [sample.epoch for sample in batch] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert sorted(sample.prompt_index for sample in batch[:3]) == [0, 1, 2]


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_shard_the_global_batch(world_size):
    """Ranks' batches must be disjoint slices whose union (in rank order) is exactly the 1-rank batch, with
    index_in_step global; otherwise ranks would duplicate or miss prompts."""
    prompt_set = make_prompt_set(13)
    single = PromptSampler(prompt_set, prompts_per_step=8, seed=5)
    ranks = [PromptSampler(prompt_set, prompts_per_step=8, seed=5, rank=rank, world_size=world_size)
             for rank in range(world_size)]
    for _ in range(4):
        expected = [(sample.prompt_index, sample.index_in_step) for sample in single.next_batch()]
        per_rank = [[(sample.prompt_index, sample.index_in_step) for sample in sampler.next_batch()]
                    for sampler in ranks]
        assert all(len(batch) == 8 // world_size for batch in per_rank)
        assert [pair for batch in per_rank for pair in batch] == expected
        assert len({index for batch in per_rank for _, index in batch}) == 8


def test_sampler_argument_errors():
    """Indivisible prompts_per_step, a bad rank, and an empty set must be rejected with a clear reason."""
    prompt_set = make_prompt_set(4)
    with pytest.raises(ValueError, match="prompts_per_step = 6 is not divisible by world_size = 4"):
        PromptSampler(prompt_set, prompts_per_step=6, seed=0, world_size=4)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, 2\)"):
        PromptSampler(prompt_set, prompts_per_step=4, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="prompts_per_step must be a positive integer"):
        PromptSampler(prompt_set, prompts_per_step=0, seed=0)
    with pytest.raises(ValueError, match="empty prompt set"):
        PromptSampler(make_prompt_set(0), prompts_per_step=1, seed=0)


def test_state_round_trip_continues_the_same_sequence():
    """A sampler restored from a (JSON round-tripped) state must produce exactly the batches the original would
    have produced next, including across an epoch boundary and on a different number of ranks."""
    prompt_set = make_prompt_set(7)
    original = PromptSampler(prompt_set, prompts_per_step=4, seed=11)
    prompt_indices(original, 3)
    state = json.loads(json.dumps(original.state_dict()))
    expected = prompt_indices(original, 5)

    restored = PromptSampler(prompt_set, prompts_per_step=4, seed=11)
    restored.load_state_dict(state)
    assert prompt_indices(restored, 5) == expected

    two_ranks = [PromptSampler(prompt_set, prompts_per_step=4, seed=11, rank=rank, world_size=2) for rank in (0, 1)]
    for sampler in two_ranks:
        sampler.load_state_dict(state)
    sharded = [prompt_indices(sampler, 5) for sampler in two_ranks]
    assert [sharded[0][step] + sharded[1][step] for step in range(5)] == expected


def test_state_from_another_prompt_set_is_rejected():
    """Loading a state saved with a different number of prompts must fail, not silently change the sequence."""
    state = PromptSampler(make_prompt_set(7), prompts_per_step=2, seed=0).state_dict()
    sampler = PromptSampler(make_prompt_set(8), prompts_per_step=2, seed=0)
    with pytest.raises(ValueError, match="saved with 7 prompts but the prompt set now has 8"):
        sampler.load_state_dict(state)
    with pytest.raises(ValueError, match="must have keys"):
        sampler.load_state_dict({"epoch": 0, "position": 0})
    with pytest.raises(ValueError, match="invalid epoch/position"):
        sampler.load_state_dict({"epoch": 0, "position": 8, "num_prompts": 8})


def test_sample_seed_matches_its_documented_definition():
    """sample_seed must equal the documented SHA-256 formula (so seeds are stable across processes and
    versions), stay in [0, 2**63), and differ across steps and prompt indices."""
    def documented(seed, step, index):
        digest = hashlib.sha256(f"opdgraph:sample:{seed}:{step}:{index}".encode()).digest()
        return int.from_bytes(digest[:8], "big") >> 1

    seeds = {sample_seed(1234, step, index) for step in range(5) for index in range(8)}
    assert len(seeds) == 40
    assert all(0 <= seed < 2**63 for seed in seeds)
    for arguments in [(0, 0, 0), (1234, 3, 7), (-1, 10**6, 5)]:
        assert sample_seed(*arguments) == documented(*arguments)

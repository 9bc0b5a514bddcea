"""Logit parity of our decoder with Hugging Face transformers (eager attention) for every supported family (Qwen3.5's
linear-attention layers included: their paged forwards carry a recurrent state per sequence slot).

Each tiny HF model is built from a config object with a fixed seed, its 1-D parameters (norm weights, biases) are
perturbed so that norms and biases matter, and it is saved with save_pretrained; our loader reads that directory.
References are per-sequence HF forwards; ours are packed and paged forwards of the same tokens.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from opdgraph.models import load_decoder
from opdgraph.models.attention_metadata import PagedMetadata
from opdgraph.models.packing import pack
from opdgraph.models.tiny_configs import TINY_CONFIGS, tiny_config

FAMILIES = sorted(TINY_CONFIGS)
# Longer than the tiny Gemma sliding window (4) and than llama3's original context band edge tokens.
SEQUENCE_LENGTHS = (11, 3, 7, 1)


def build_hf_model(config: dict, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    hf_config = transformers.AutoConfig.for_model(**config)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def hf_and_ours(request, tmp_path_factory):
    hf_model = build_hf_model(tiny_config(request.param))
    directory = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(directory)
    return request.param, hf_model, load_decoder(directory, dtype=torch.float32)


def random_sequences(lengths, vocab_size=300, seed=1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (length,), generator=generator).tolist() for length in lengths]


@torch.no_grad()
def hf_logits(hf_model, sequences) -> list[torch.Tensor]:
    return [hf_model(torch.tensor([sequence])).logits[0].float() for sequence in sequences]


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> None:
    error = (actual - expected).abs().max() / expected.abs().max()
    assert error < tolerance, f"relative error {error:.3g} >= {tolerance}"


def test_single_sequence_matches_transformers(hf_and_ours):
    """A plain (one-sequence) forward differs from transformers: a layer, norm, RoPE or config option is wrong."""
    _, hf_model, ours = hf_and_ours
    sequence = random_sequences([13])
    input_ids, positions, meta = pack(sequence)
    with torch.no_grad():
        logits = ours.logits(ours.forward_hidden(input_ids, positions, meta))
    assert_close_relative(logits, hf_logits(hf_model, sequence)[0])


def test_packed_sequences_match_per_sequence_transformers(hf_and_ours):
    """Packed logits differ from separate HF forwards: attention leaks across sequences or positions don't restart."""
    _, hf_model, ours = hf_and_ours
    sequences = random_sequences(SEQUENCE_LENGTHS)
    input_ids, positions, meta = pack(sequences)
    with torch.no_grad():
        logits = ours.logits(ours.forward_hidden(input_ids, positions, meta))
    assert_close_relative(logits, torch.cat(hf_logits(hf_model, sequences)))


class PageAllocator:
    """Hands out cache pages in a scrambled order so that a sequence's pages are never contiguous."""

    def __init__(self, num_pages: int, page_size: int, num_sequences: int):
        self.free = torch.randperm(num_pages, generator=torch.Generator().manual_seed(3)).tolist()
        self.page_size = page_size
        self.pages: list[list[int]] = [[] for _ in range(num_sequences)]
        self.lengths = [0] * num_sequences

    def step(self, new_token_counts: list[int]) -> PagedMetadata:
        slots = []
        for seq, count in enumerate(new_token_counts):
            for position in range(self.lengths[seq], self.lengths[seq] + count):
                if position // self.page_size == len(self.pages[seq]):
                    self.pages[seq].append(self.free.pop())
                slots.append(self.pages[seq][position // self.page_size] * self.page_size + position % self.page_size)
            self.lengths[seq] += count
        widest = max(len(pages) for pages in self.pages)
        page_table = torch.full((len(self.pages), widest), -1, dtype=torch.int32)
        for seq, pages in enumerate(self.pages):
            page_table[seq, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        query_lens = torch.tensor(new_token_counts, dtype=torch.int32)
        cu_query_lens = torch.zeros(len(new_token_counts) + 1, dtype=torch.int32)
        cu_query_lens[1:] = torch.cumsum(query_lens, 0)
        # Recurrent-state slots (Qwen3.5's linear-attention layers), in reverse so that slot != sequence index.
        state_slots = torch.arange(len(self.pages) - 1, -1, -1)
        return PagedMetadata(query_lens=query_lens, cu_query_lens=cu_query_lens,
                             kv_lens=torch.tensor(self.lengths, dtype=torch.int32), page_table=page_table,
                             slot_mapping=torch.tensor(slots, dtype=torch.int64), page_size=self.page_size,
                             state_slots=state_slots)


def run_paged(ours, sequences, schedule, page_size=3) -> list[torch.Tensor]:
    """Feed each sequence's tokens in the chunks `schedule` gives (list of per-sequence counts per step).

    Returns per sequence the logits of all its tokens, gathered across steps.
    """
    allocator = PageAllocator(num_pages=64, page_size=page_size, num_sequences=len(sequences))
    kv_cache = ours.allocate_kv_cache(64, page_size, num_state_slots=len(sequences))
    consumed = [0] * len(sequences)
    gathered: list[list[torch.Tensor]] = [[] for _ in sequences]
    for counts in schedule:
        meta = allocator.step(counts)
        ids, positions = [], []
        for seq, count in enumerate(counts):
            ids += sequences[seq][consumed[seq]: consumed[seq] + count]
            positions += range(consumed[seq], consumed[seq] + count)
        hidden = ours.forward_paged(torch.tensor(ids), torch.tensor(positions), meta, kv_cache)
        logits = ours.logits(hidden)
        offset = 0
        for seq, count in enumerate(counts):
            gathered[seq].append(logits[offset: offset + count])
            offset += count
            consumed[seq] += count
    assert consumed == [len(sequence) for sequence in sequences]
    return [torch.cat(parts) for parts in gathered]


def test_paged_prefill_then_decode_matches_transformers(hf_and_ours):
    """Paged prefill + token-by-token decode disagree with HF: cache writes, page lookups or masks are wrong."""
    _, hf_model, ours = hf_and_ours
    sequences = random_sequences([5, 2, 9])
    # One batched prefill of each prompt, then one token per sequence per step (sequences finish at different steps;
    # a finished sequence contributes 0 tokens).
    prompts = [4, 1, 3]
    schedule = [prompts]
    remaining = [len(s) - p for s, p in zip(sequences, prompts)]
    while any(remaining):
        schedule.append([1 if left else 0 for left in remaining])
        remaining = [max(left - 1, 0) for left in remaining]
    paged = run_paged(ours, sequences, schedule)
    for ours_logits, reference in zip(paged, hf_logits(hf_model, sequences)):
        assert_close_relative(ours_logits, reference)


def test_paged_chunked_prefill_matches_transformers(hf_and_ours):
    """Appending several tokens to an existing context (chunked prefill) breaks causal masking inside the chunk."""
    _, hf_model, ours = hf_and_ours
    sequences = random_sequences([12, 10], seed=5)
    paged = run_paged(ours, sequences, [[5, 2], [4, 6], [3, 2]], page_size=4)
    for ours_logits, reference in zip(paged, hf_logits(hf_model, sequences)):
        assert_close_relative(ours_logits, reference)


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "qwen3_5"])
def test_bfloat16_close_to_transformers_bfloat16(family, tmp_path):
    """bf16 forward drifts from HF's bf16 forward beyond rounding: a cast happens at a different place."""
    hf_model = build_hf_model(tiny_config(family))
    hf_model.save_pretrained(tmp_path)
    hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16,
                                                                attn_implementation="eager").eval()
    ours = load_decoder(tmp_path, dtype=torch.bfloat16)
    assert ours.lm_head_weight.dtype == torch.bfloat16
    sequences = random_sequences([9, 6])
    input_ids, positions, meta = pack(sequences)
    with torch.no_grad():
        hidden = ours.forward_hidden(input_ids, positions, meta)
        reference = torch.cat([hf_bf16.model(torch.tensor([s])).last_hidden_state[0] for s in sequences])
    assert hidden.dtype == torch.bfloat16
    # On CPU the two agree bit for bit; the tolerance only leaves room for other kernels.
    assert_close_relative(hidden.float(), reference.float(), tolerance=1e-3)

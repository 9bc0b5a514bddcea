"""The rollout engine driving the real decoder generates exactly what transformers `generate` does (greedy, float32),
for every family, also with n > 1 sharing prompt pages and with a pool small enough to force preemption."""

from __future__ import annotations

import pytest
import torch

from opdgraph.models import load_decoder
from opdgraph.models.tiny_configs import TINY_CONFIGS, tiny_config
from opdgraph.rollout import Request, RolloutEngine, SamplingParams
from test_models_parity import build_hf_model, random_sequences

NEW_TOKENS = 12
PROMPT_LENGTHS = (9, 4, 13)


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def hf_and_ours(request, tmp_path_factory):
    hf_model = build_hf_model(tiny_config(request.param))
    directory = tmp_path_factory.mktemp(f"engine-{request.param}")
    hf_model.save_pretrained(directory)
    return hf_model, load_decoder(directory, dtype=torch.float32)


def hf_greedy(hf_model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("num_pages, n", [(64, 1), (64, 2), (9, 1)], ids=["roomy", "n2-shared-prefix", "preempting"])
def test_engine_greedy_equals_transformers_generate(hf_and_ours, num_pages, n):
    """A mismatch means the paged path, prefix sharing or preemption-resume changes what the student samples."""
    hf_model, ours = hf_and_ours
    prompts = random_sequences(PROMPT_LENGTHS, seed=3)
    engine = RolloutEngine(ours, page_size=4, num_pages=num_pages, max_num_seqs=6, prefill_token_budget=8,
                           device="cpu")
    params = SamplingParams(max_new_tokens=NEW_TOKENS, greedy=True)
    responses = engine.generate([Request(request_id=str(i), prompt_ids=p, params=params, n=n)
                                 for i, p in enumerate(prompts)])
    expected = [hf_greedy(hf_model, p) for p in prompts]
    assert [r.token_ids for r in responses] == [e for e in expected for _ in range(n)]
    if num_pages == 9:
        assert engine.stats.preemptions > 0  # the small pool really forced preemption

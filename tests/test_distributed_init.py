"""How `init_distributed` joins torchrun's process group, checked without GPUs (the group calls are recorded).

The 2-GPU throughput run printed NCCL's "Guessing device ID based on global rank. This can cause a hang" and timed
out; the NCCL group must be bound to the rank's own GPU (LOCAL_RANK) when it is created.
"""

from __future__ import annotations

import pytest
import torch

from opdgraph.runtime import distributed


@pytest.fixture
def recorded(monkeypatch):
    calls = {}
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("NCCL_NVLS_ENABLE", raising=False)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, **kwargs: calls.update(backend=backend, **kwargs))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.update(set_device=device))
    monkeypatch.setattr(distributed.sys, "stdout", distributed.sys.stdout)  # is_main() is true while not initialised
    return calls


def test_nccl_group_is_bound_to_the_local_rank_device(recorded):
    """NCCL would again guess each rank's GPU from its global rank (the warning that preceded the 2-GPU hang)."""
    import os

    distributed.init_distributed("cuda")
    assert recorded["backend"] == "nccl"
    assert recorded["device_id"] == torch.device("cuda", 1) == recorded["set_device"]
    assert os.environ["NCCL_NVLS_ENABLE"] == "0"


def test_cpu_group_is_gloo_without_a_device(recorded):
    """A CPU run under torchrun would ask for a CUDA device (and fail on machines without one)."""
    distributed.init_distributed("cpu")
    assert recorded == {"backend": "gloo"}


def test_unsharding_engine_drops_graphs_before_each_rollout():
    """FSDP re-creates the gathered weights at every gather, so graphs captured in one rollout may point at freed
    memory in the next (review: with release_phase_buffers = false nothing else drops them). The wrapper must drop
    them before every generate, and the engine's drop must reach both graph owners."""
    import torch

    from opdgraph.models import load_model
    from opdgraph.models.tiny_configs import tiny_config
    from opdgraph.rollout import Request, RolloutEngine, SamplingParams
    from opdgraph.runtime.fsdp import UnshardingEngine

    model = load_model(tiny_config("qwen2"), dtype=torch.float32)[0]
    engine = RolloutEngine(model, page_size=4, num_pages=32, max_num_seqs=4, prefill_token_budget=32, device="cpu",
                           decode_burst_steps=4)
    drops = []
    original = engine.burst.release
    engine.burst.release = lambda: (drops.append(1), original())
    wrapped = UnshardingEngine(engine, model)
    request = Request("r", [1, 2, 3], SamplingParams(max_new_tokens=6, greedy=True))
    first = wrapped.generate([request])
    after_first = len(drops)
    second = wrapped.generate([request])  # the KV pool is kept: only the wrapper can drop the graphs now
    assert len(drops) > after_first and first[0].token_ids == second[0].token_ids

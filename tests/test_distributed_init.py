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

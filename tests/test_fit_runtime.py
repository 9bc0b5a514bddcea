"""The runtime side of the fit search (opdgraph.runtime.offload): parameter swaps, layer streaming, the streamed
optimizer step, and the executor running offloaded plans of the tiny pipeline on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from opdgraph import sizing
from opdgraph.config import load_pipeline
from opdgraph.fit import fit_plan
from opdgraph.models.loading import build_random
from opdgraph.placement import Placement
from opdgraph.runtime import offload
from opdgraph.runtime.run import run_pipeline
from opdgraph.train import optimizer_layout
from opdgraph.train.optimizer import MasterAdamW

TINY = Path(__file__).resolve().parents[1] / "pipelines" / "tiny.toml"
CONFIG = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 64}


def test_bucket_size_matches_the_optimizer():
    """If this fails, the planner sizes the streamed optimizer bucket differently from the optimizer's buckets."""
    assert sizing.OPTIMIZER_BUCKET_ELEMENTS == optimizer_layout._BUCKET_ELEMENTS


class FakeDeviceTensor:
    """Stands in for a device tensor: records which host tensor it was copied from."""

    def __init__(self, source):
        self.source = source
        self.device = torch.device("meta")


def test_parameter_swap_logic_with_a_fake_device():
    """If this fails, the swap copies the host side again on every offload (the pinned copies are made once), a
    second reload copies again, or an offload does not point each parameter back at its own host copy."""
    class Holder:  # a parameter-like object whose .data can be anything, so the moves are visible on CPU
        def __init__(self, data):
            self.data = data
            self.device = data.device

    parameters = [Holder(torch.randn(4, 3)), Holder(torch.randn(5))]
    originals = [parameter.data.clone() for parameter in parameters]
    swap = offload.ParameterSwap(parameters, torch.device("meta"))
    assert not swap.on_device
    copies = []
    original_to = torch.Tensor.to

    def fake_to(tensor, device, non_blocking=False):
        copies.append(tensor)
        return FakeDeviceTensor(tensor)
    torch.Tensor.to = fake_to
    try:
        swap.to_device()
        swap.to_device()  # already there: no new copies
    finally:
        torch.Tensor.to = original_to
    assert len(copies) == 2 and all(isinstance(parameter.data, FakeDeviceTensor) for parameter in parameters)
    assert [parameter.data.source for parameter in parameters] == swap.host
    swap.to_host()
    assert all(parameter.data is host for parameter, host in zip(parameters, swap.host))
    for parameter, original in zip(parameters, originals):
        assert torch.equal(parameter.data, original)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_parameter_swap_frees_and_restores_device_memory():
    """If this fails, offloading parameters does not free their device memory, or reloading changes their values."""
    layer = torch.nn.Linear(1024, 1024, device="cuda")
    expected = layer.weight.detach().clone()
    swap = offload.ParameterSwap(list(layer.parameters()), torch.device("cuda"))
    before = torch.cuda.memory_allocated()
    swap.to_host()
    assert layer.weight.device.type == "cpu" and layer.weight.is_pinned()
    assert torch.cuda.memory_allocated() <= before - 1024 * 1024 * 4
    swap.to_device()
    torch.testing.assert_close(layer.weight, expected, rtol=0, atol=0)


def test_layer_streamer_gives_the_same_hidden_states():
    """If this fails, streaming a model's layers (hooks that bring each layer in and drop it after) changes its
    forward, or leaves a layer pointing at a device copy after the forward."""
    from opdgraph.runtime.batches import Sample, build_micro_batches

    model = build_random(CONFIG, dtype=torch.float32, init_seed=3)
    streamed = build_random(CONFIG, dtype=torch.float32, init_seed=3)
    samples = [Sample(prompt_ids=[1, 2, 3], response_ids=[4, 5, 6, 7], prompt_index=0, sample_index=0,
                      finish_reason="length", logprobs=[0.0] * 4, answer=None)]
    batch = build_micro_batches(samples, budgets={"tokens": 64}, normalize="token", global_tokens=4,
                                global_sequences=1, device=torch.device("cpu"))[0]
    streamer = offload.LayerStreamer(streamed.layers, torch.device("cpu"))
    with torch.no_grad():
        expected = model.forward_hidden(batch.input_ids, batch.positions, batch.meta)
        got = streamed.forward_hidden(batch.input_ids, batch.positions, batch.meta)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for swap in streamer.swaps:
        assert [p.data_ptr() for p in swap.parameters] == [host.data_ptr() for host in swap.host]
    assert not streamer.prefetched


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_streamed_adamw_matches_master_adamw(dtype):
    """If this fails, the optimizer step with its state in host memory (streamed bucket by bucket) updates the
    weights, masters or moments differently from the plain MasterAdamW, or an fp32 parameter's master stops being
    the parameter itself."""
    torch.manual_seed(0)
    reference, streamed = (torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4)).to(dtype)
                           for _ in range(2))
    streamed.load_state_dict(reference.state_dict())
    hyper = dict(lr=1e-2, weight_decay=0.1)
    plain = MasterAdamW(list(reference.named_parameters()), **hyper)
    original_bucket = optimizer_layout._BUCKET_ELEMENTS
    optimizer_layout._BUCKET_ELEMENTS = 100  # several buckets, so the streaming loop runs more than once
    try:
        offloaded = offload.build_optimizer(Placement(optimizer_state="offload"), streamed, torch.device("cpu"),
                                            **hyper)
        for _ in range(3):
            for model in (reference, streamed):
                for parameter in model.parameters():
                    parameter.grad = torch.randn(parameter.shape, generator=torch.Generator().manual_seed(
                        parameter.numel())).to(dtype)
            plain.step()
            offloaded.step()
    finally:
        optimizer_layout._BUCKET_ELEMENTS = original_bucket
    for (name, expected), got in zip(reference.named_parameters(), streamed.parameters()):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        torch.testing.assert_close(offloaded.exp_avg_sq[name], plain.exp_avg_sq[name], rtol=0, atol=0)
        if dtype == torch.float32:
            assert offloaded.masters[name].data_ptr() == dict(streamed.named_parameters())[name].data_ptr()


def _run(tmp_path: Path, name: str, *overrides: str):
    cfg = load_pipeline(TINY, [f"pipeline.output_dir={tmp_path / name}", "log.progress=false",
                               "pipeline.num_steps=2", "pipeline.device=\"cpu\"",
                               "pipeline.debug_memory=true", "data.prompts_per_step=2", "rollout.max_new_tokens=8",
                               "eval.num_prompts=2", "teacher_score.micro_batch_tokens=80", *overrides])
    fitted = fit_plan(cfg)
    ctx = run_pipeline(fitted.cfg, fitted.plan)
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines if json.loads(line)["kind"] == "train"]
    return fitted, ctx, losses


def test_offloaded_plans_train_like_the_plain_one(tmp_path, monkeypatch):
    """If this fails, a plan with the teacher offloaded or streamed and the optimizer state in host memory no longer
    trains exactly like the plain plan on CPU (where every move is a no-op), or the executor stops dispatching the
    plan's teacher reload / offload to the offloader (once per training step, not once per micro-batch)."""
    calls = []
    monkeypatch.setattr(offload.HostOffloader, "reload", lambda self, name: calls.append(("reload", name)))
    monkeypatch.setattr(offload.HostOffloader, "offload", lambda self, name: calls.append(("offload", name)))
    _, _, plain = _run(tmp_path, "plain")
    for teacher in ("offload", "stream"):
        calls.clear()
        fitted, ctx, losses = _run(tmp_path, teacher, f'pipeline.fit.teacher_weights="{teacher}"',
                                   'pipeline.fit.optimizer_state="offload"')
        assert fitted.decisions.teacher_weights == teacher and fitted.decisions.optimizer_state == "offload"
        assert isinstance(ctx.optimizer, offload.StreamedAdamW)
        assert losses == plain
        assert calls.count(("offload", "teacher.weights")) == 2  # one per training step
        assert ("reload", "teacher.weights") in calls

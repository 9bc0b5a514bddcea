"""One real training step over fixed samples, for the tests that check it against float64 references.

`run_step` drives the runtime's PlanExecutor over a compiled plan with only the rollout replaced: the micro-batches
are built from the given samples (their routes and gold prefixes included) exactly as the rollout stage builds
them, and the gradients handed to the optimizer are recorded instead of applied. `context` builds a pipeline's run
on CPU; `float64_copy`, `sequence_hidden` and `relative_error` are the pieces the references are made of.
Used by tests/test_composed_training.py, test_composed_eval.py, test_hybrid_training.py, test_declared_buffers.py
and test_grad_accumulation.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from opdgraph.compile import compile_plan
from opdgraph.config import load_pipeline
from opdgraph.models.decoder import DecoderLM
from opdgraph.runtime import rollout_step
from opdgraph.runtime.batches import Sample, build_micro_batches
from opdgraph.runtime.build import build_context
from opdgraph.runtime.executor import PlanExecutor

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
COMMON = ["log.progress=false", "pipeline.device=cpu", "step.max_grad_norm=0", "pipeline.debug_memory=true"]


def context(tmp_path: Path, pipeline: str, *extra: str):
    """(config, plan, run context) of `pipelines/<pipeline>` on CPU with unclipped gradients."""
    cfg = load_pipeline(PIPELINES / pipeline, [f"pipeline.output_dir={tmp_path / 'run'}", *COMMON, *extra])
    plan = compile_plan(cfg)
    return cfg, plan, build_context(cfg, plan, tmp_path / "run")


def float64_copy(model) -> DecoderLM:
    copy = DecoderLM(model.config).to(torch.float64)
    copy.load_state_dict({name: value.double() for name, value in model.state_dict().items()})
    return copy


def sequence_hidden(model, ids: list[int], positions: range) -> torch.Tensor:
    """Final hidden states of one unpacked sequence at `positions`, in float64."""
    from opdgraph.models.attention_metadata import PackedMetadata

    tensor = torch.tensor(ids)
    meta = PackedMetadata(cu_seqlens=torch.tensor([0, len(ids)], dtype=torch.int32), max_seqlen=len(ids))
    return model.forward_hidden(tensor, torch.arange(len(ids)), meta)[list(positions)]


def run_step(cfg, plan, ctx, samples: list[Sample], monkeypatch) -> dict[str, torch.Tensor]:
    """One training step over `samples` instead of a rollout; returns the gradients handed to the optimizer (in
    float64). The loss normalises over the samples' response tokens, the sft stage over their gold-prefix tokens."""
    def fixed_rollout(config, inputs) -> None:
        facts = inputs.run.facts
        sft = facts.get("sft")
        gold = (sft.normalize if sft is not None else "token", sum(s.gold_prefix_length for s in samples),
                sum(s.gold_prefix_length > 0 for s in samples))
        batches = build_micro_batches(samples, budgets=facts["micro_batch_budgets"], normalize="token",
                                      global_tokens=sum(len(s.response_ids) for s in samples),
                                      global_sequences=len(samples), device=inputs.run.device,
                                      route_groups=facts.get("route_groups"),
                                      group_order=facts.get("group_order", ("",)), gold=gold)
        inputs.values.put("responses", rollout_step.RolloutBatch(samples, batches))

    handed = {}

    def recording_step(lr, grads):
        handed.update({name: grad.double().clone() for name, grad in grads.items()})
        return True

    monkeypatch.setattr(rollout_step, "run_rollout", fixed_rollout)
    monkeypatch.setattr(ctx.optimizer, "step", recording_step)
    hooks = {"rollout.kv_cache": ctx.engine.release, ctx.facts["grads_buffer"]: ctx.optimizer.zero_grad}
    PlanExecutor(plan, {name: stage.config for name, stage in cfg.stages.items()}, ctx,
                 release_hooks=hooks).run_training_step()
    return handed


def random_samples(count: int, routes: list, seed: int = 3) -> list[Sample]:
    """Random prompts and responses; sample i carries routes[i % len(routes)]."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for index in range(count):
        prompt = torch.randint(3, 300, (int(torch.randint(5, 12, (1,), generator=generator)),),
                               generator=generator).tolist()
        response = torch.randint(3, 300, (int(torch.randint(3, 10, (1,), generator=generator)),),
                                 generator=generator).tolist()
        samples.append(Sample(prompt_ids=prompt, response_ids=response, prompt_index=index, sample_index=0,
                              route=routes[index % len(routes)]))
    return samples


def relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """|got - want| / |want| over every named tensor at once."""
    assert set(got) == set(want)
    error = sum(((got[name] - want[name]) ** 2).sum() for name in want).sqrt()
    return float(error / sum((want[name] ** 2).sum() for name in want).sqrt())

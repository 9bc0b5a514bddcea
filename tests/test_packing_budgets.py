"""The training micro-batch packer keeps every per-micro-batch size the plan bounded, for adversarial samples.

The plan sizes a micro-batch as its sequences per micro-batch x one sequence's bound (student tokens, positions
outside a gold prefix, gold-prefix positions, each teacher's own view). Packing by the student's tokens alone let
many short prompts in: then every one of them carries a whole gold prefix or a whole teacher system prompt, and
those sizes went past the plan (tiny_hybrid: 312 gold positions where the plan held 96). The bounds here are read
from the compiled plan of a shipped pipeline; the samples are built to stress them.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from opdgraph.compile import compile_plan
from opdgraph.config.loader import load_pipeline
from opdgraph.runtime.batches import Sample, build_micro_batches, training_budgets

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def _plan(name: str, overrides=()):
    cfg = load_pipeline(str(PIPELINES / name), list(overrides))
    return cfg, compile_plan(cfg)


def _pack(samples, plan, teacher_stages):
    return build_micro_batches(samples, budgets=training_budgets(plan.facts, teacher_stages), normalize="token",
                               global_tokens=sum(len(s.response_ids) for s in samples),
                               global_sequences=len(samples), device=torch.device("cpu"),
                               gold=("token", sum(s.gold_prefix_length for s in samples), len(samples)))


def test_short_prompts_with_whole_gold_prefixes_stay_inside_the_planned_positions():
    cfg, plan = _plan("tiny_hybrid.toml")
    gold_bound = plan.facts["train.gold_prefix_tokens"]
    rng = random.Random(0)
    samples = []
    for index in range(plan.facts["rollout.sequences"]):  # 2-token prompts, whole prefixes, 1-3 response tokens
        gold = gold_bound
        samples.append(Sample(prompt_ids=[rng.randrange(50) for _ in range(2 + gold)],
                              response_ids=[rng.randrange(50) for _ in range(rng.randint(1, 3))],
                              prompt_index=index, sample_index=0, gold_prefix_length=gold))
    batches = _pack(samples, plan, ["teacher_score"])
    per_micro_batch = plan.facts["train.sequences_per_micro_batch"]
    for batch in batches:
        gold_positions = sum(s.gold_prefix_length for s in batch.samples)
        tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in batch.samples)
        assert gold_positions <= per_micro_batch * gold_bound  # the sft stage's planned prefix positions
        assert tokens - gold_positions <= plan.facts["train.micro_batch_scored_tokens"]
        assert tokens <= plan.facts["train.micro_batch_tokens"]
    assert len(batches) <= plan.facts["train.num_micro_batches"]
    assert sum(len(batch.samples) for batch in batches) == len(samples)  # nothing dropped
    by_tokens = build_micro_batches(samples, budgets={"tokens": plan.facts["train.micro_batch_tokens"]},
                                    normalize="token", global_tokens=3 * len(samples), global_sequences=len(samples),
                                    device=torch.device("cpu"), gold=("token", gold_bound * len(samples), 1))
    assert max(sum(s.gold_prefix_length for s in batch.samples) for batch in by_tokens) > per_micro_batch * gold_bound


def test_a_teacher_system_prompt_on_short_prompts_stays_inside_its_planned_forward():
    cfg, plan = _plan("tiny_self.toml")
    system = 90  # the teacher's view: a long system prompt (within its max_prompt_tokens) before a short prompt
    bound = plan.facts["teacher_score.forward_tokens"]
    samples = [Sample(prompt_ids=[1, 2], response_ids=[3], prompt_index=i, sample_index=0,
                      teacher_prompt_ids={"teacher_score": [7] * system + [1, 2]})
               for i in range(64)]
    batches = _pack(samples, plan, ["teacher_score"])
    for batch in batches:
        assert sum(len(s.teacher_prompt_ids["teacher_score"]) + len(s.response_ids) for s in batch.samples) <= bound
        assert batch.teacher_views["teacher_score"].input_ids.numel() <= bound
    per_micro_batch = plan.facts["train.sequences_per_micro_batch"]
    assert len(batches) <= -(-len(samples) // per_micro_batch)  # never more micro-batches than the plan's count
    # Packed by the student's tokens alone, these samples overflow the teacher's forward: the check above can fail.
    by_tokens = build_micro_batches(samples, budgets={"tokens": plan.facts["train.micro_batch_tokens"]},
                                    normalize="token", global_tokens=len(samples), global_sequences=len(samples),
                                    device=torch.device("cpu"))
    assert max(batch.teacher_views["teacher_score"].input_ids.numel() for batch in by_tokens) > bound


def test_a_sample_beyond_a_budget_is_an_error_naming_the_fact():
    cfg, plan = _plan("tiny_self.toml")
    bound = plan.facts["teacher_score.forward_tokens"]
    sample = Sample(prompt_ids=[1], response_ids=[2], prompt_index=0, sample_index=0,
                    teacher_prompt_ids={"teacher_score": [7] * bound})
    with pytest.raises(ValueError, match="teacher_score.forward_tokens"):
        _pack([sample], plan, ["teacher_score"])

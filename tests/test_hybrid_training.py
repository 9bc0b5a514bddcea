"""Hybrid SFT + OPD (pipelines/tiny_hybrid.toml) through the real PlanExecutor, against float64 references.

One training step over fixed samples whose prompts end with a gold prefix (only rollout is replaced; some samples
have no prefix):
- the gradient handed to the optimizer equals the sum of two float64 gradients computed separately: a plain
  cross-entropy on the gold-prefix positions (weight / the step's prefix tokens) and the reverse KL to the teacher
  on the continuation positions (1 / the step's continuation tokens);
- the teacher runs over exactly each sample's sequence (prompt + prefix + continuation: the context the
  continuation needs, nothing more) and the divergence reads its hidden states at the continuation positions only;
  the plan's teacher buffers and the loss's chunks count the same positions.
"""

from __future__ import annotations

import copy

import pytest
import torch

from opdgraph.runtime.batches import Sample, build_micro_batches
from tests.training_harness import context, float64_copy, relative_error, run_step, sequence_hidden

WEIGHT = 0.7


def _hybrid_samples(count: int, seed: int = 11) -> list[Sample]:
    """Prompts ending with a gold prefix of 0..7 tokens (the first sample has none), then a response."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for index in range(count):
        def draw(low, high):
            return torch.randint(3, 250, (int(torch.randint(low, high, (1,), generator=generator)),),
                                 generator=generator).tolist()
        prompt, response = draw(6, 12), draw(3, 9)
        prefix = [] if index == 0 else draw(1, 8)
        samples.append(Sample(prompt_ids=prompt + prefix, response_ids=response, prompt_index=index,
                              sample_index=0, gold_prefix_length=len(prefix)))
    return samples


def _gradients(model, loss_of) -> dict:
    """float64 gradients of one loss term, on a fresh copy of `model`."""
    model = copy.deepcopy(model)
    loss_of(model).backward()
    return {name: param.grad.clone() for name, param in model.named_parameters()}


@pytest.mark.parametrize("normalize, micro_batch_tokens", [("token", 512), ("sequence", 120)])
def test_combined_gradient_is_prefix_ce_plus_continuation_divergence(tmp_path, monkeypatch, normalize,
                                                                     micro_batch_tokens):
    """Fails if the cross-entropy covers other positions than the gold prefix (or the divergence the prefix), either
    term is normalised by other counts than documented (sft "token": 1 / the step's prefix tokens; "sequence":
    1 / (sequences with a prefix x its length)), the weight is not applied, or the two gradients do not meet in the
    one backward, also accumulated over several micro-batches (120 tokens: one planned sequence each)."""
    cfg, plan, ctx = context(tmp_path, "tiny_hybrid.toml", f"sft.weight={WEIGHT}", f"sft.normalize={normalize}",
                             f"teacher_score.micro_batch_tokens={micro_batch_tokens}")
    samples = _hybrid_samples(7 if micro_batch_tokens == 512 else 14)
    student, teacher = float64_copy(ctx.student), float64_copy(ctx.teacher)
    handed = run_step(cfg, plan, ctx, samples, monkeypatch)
    if micro_batch_tokens == 120:  # one planned sequence per micro-batch: these samples' prefixes need several
        assert sum(len(s.prompt_ids) + len(s.response_ids) for s in samples) > plan.facts["train.micro_batch_tokens"]
    gold_tokens = sum(s.gold_prefix_length for s in samples)
    with_prefix = sum(s.gold_prefix_length > 0 for s in samples)
    response_tokens = sum(len(s.response_ids) for s in samples)
    vocab = student.config.vocab_size

    def cross_entropy(model):
        total = 0
        for s in samples:
            prompt, k = s.prompt_ids, s.gold_prefix_length
            if not k:
                continue
            hidden = sequence_hidden(model, prompt + s.response_ids, range(len(prompt) - k - 1, len(prompt) - 1))
            summed = torch.nn.functional.cross_entropy(hidden @ model.lm_head_weight.T, torch.tensor(prompt[-k:]),
                                                       reduction="sum")
            total = total + (summed if normalize == "token" else summed / k / with_prefix)
        return WEIGHT * total / (gold_tokens if normalize == "token" else 1)

    def reverse_kl(model):
        total = 0
        for s in samples:
            ids, first = s.prompt_ids + s.response_ids, len(s.prompt_ids) - 1
            positions = range(first, first + len(s.response_ids))
            with torch.no_grad():
                teacher_logp = torch.log_softmax(sequence_hidden(teacher, ids, positions)
                                                 @ teacher.lm_head_weight[:vocab].T, dim=-1)
            student_logp = torch.log_softmax(sequence_hidden(model, ids, positions) @ model.lm_head_weight.T, -1)
            total = total + (student_logp.exp() * (student_logp - teacher_logp)).sum()
        return total / response_tokens

    ce, divergence = _gradients(student, cross_entropy), _gradients(student, reverse_kl)
    combined = {name: ce[name] + divergence[name] for name in ce}
    assert relative_error(handed, combined) < 1e-5
    assert relative_error(handed, divergence) > 1e-2 and relative_error(handed, ce) > 1e-2  # both terms matter
    record = ctx.step_record
    assert abs(record["sft_loss"] - float(cross_entropy(student).detach())) < 1e-5 * max(1.0, record["sft_loss"])
    assert abs(record["sft_cross_entropy"] - record["sft_loss"] / WEIGHT) < 1e-6 * max(1.0, record["sft_loss"])
    assert abs(record["loss"] - float(reverse_kl(student).detach())) < 1e-5


def test_teacher_scores_only_what_the_loss_reads(tmp_path, monkeypatch):
    """Fails if the teacher runs over more than each sample's own sequence (e.g. the rest of the gold), if its
    hidden states are kept or its lm_head applied at gold-prefix positions, or if the plan counts the prefix
    positions in the teacher's kept states or the divergence's chunks."""
    import opdgraph.train.divergence as divergence_module

    cfg, plan, ctx = context(tmp_path, "tiny_hybrid.toml")
    samples = _hybrid_samples(9, seed=4)
    teacher = ctx.teachers["teacher_score"].model
    forward_tokens, scored_rows = [], []
    original_forward, original_divergence = teacher.forward_hidden, divergence_module.chunked_divergence

    def counting_forward(input_ids, *args, **kwargs):
        forward_tokens.append(int(input_ids.numel()))
        return original_forward(input_ids, *args, **kwargs)

    def counting_divergence(student_hidden, student_head, teacher_hidden, *args, **kwargs):
        scored_rows.append((int(student_hidden.shape[0]), int(teacher_hidden.shape[0])))
        return original_divergence(student_hidden, student_head, teacher_hidden, *args, **kwargs)

    monkeypatch.setattr(teacher, "forward_hidden", counting_forward)
    monkeypatch.setattr(divergence_module, "chunked_divergence", counting_divergence)
    run_step(cfg, plan, ctx, samples, monkeypatch)
    assert sum(forward_tokens) == sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    response_tokens = sum(len(s.response_ids) for s in samples)
    assert sum(student for student, _ in scored_rows) == sum(t for _, t in scored_rows) == response_tokens

    # The plan, by hand: sequences of 64 prompt + 24 prefix + 32 new = 120 tokens, 512 // 120 = 4 per micro-batch;
    # the teacher's kept states and the divergence cover 4 x (64 + 32) positions, its forward all 4 x 120 tokens.
    h_teacher, h_student, fp32 = 96, 64, 4
    assert plan.facts["train.micro_batch_tokens"] == 4 * 120 and plan.facts["train.gold_prefix_tokens"] == 24
    assert plan.buffers["teacher_hidden"].bytes == 4 * 96 * h_teacher * fp32
    assert plan.buffers["student_hidden"].bytes == plan.buffers["hidden_grad"].bytes == 4 * 96 * h_student * fp32
    assert plan.buffers["sft.hidden_grad"].bytes == 4 * 24 * h_student * fp32
    assert plan.facts["loss.chunks_per_micro_batch"] == 3  # ceil(384 / 128)
    steps = {step.name: step for step in plan.steps}
    assert steps["sft"].repeats == plan.facts["train.num_micro_batches"] * 1  # ceil(96 / 128) chunks each
    assert "sft.hidden_grad" in steps["backward"].reads


def test_gold_positions_and_weights_of_the_packing():
    """Fails if the cross-entropy positions are not the ones predicting each prefix token (o+P-k-1 .. o+P-2 at
    packed offset o), their targets are not the prefix, or the weights differ from 1 / G ("token") and
    1 / (S_g x k) ("sequence") over the step's global counts."""
    samples = _hybrid_samples(4, seed=2)
    ks = [s.gold_prefix_length for s in samples]
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    offsets = [sum(lengths[:index]) for index in range(len(samples))]
    want = [o + len(s.prompt_ids) - k - 1 + j for s, o, k in zip(samples, offsets, ks) for j in range(k)]
    for normalize, total_tokens, total_sequences in (("token", 50, 9), ("sequence", 50, 9)):
        batch, = build_micro_batches(samples, budgets={"tokens": 512}, normalize="token", global_tokens=40,
                                     global_sequences=9, device=torch.device("cpu"),
                                     gold=(normalize, total_tokens, total_sequences))
        assert batch.gold_positions.tolist() == want
        assert batch.gold_targets.tolist() == [t for s, k in zip(samples, ks) for t in s.prompt_ids[-k:] if k]
        expected = [1 / total_tokens if normalize == "token" else 1 / (total_sequences * k) for k in ks
                    for _ in range(k)]
        assert torch.allclose(batch.gold_weights, torch.tensor(expected))
        assert not set(want) & set(batch.loss_positions.tolist())  # the divergence never sees a prefix position
    plain = [Sample(prompt_ids=s.prompt_ids, response_ids=s.response_ids, prompt_index=0, sample_index=0)
             for s in samples]
    batch, = build_micro_batches(plain, budgets={"tokens": 512}, normalize="token", global_tokens=40,
                                 global_sequences=4, device=torch.device("cpu"))
    assert batch.gold_positions is None and batch.gold_weights is None


def test_routed_hybrid_plan_has_an_sft_step_per_teacher_loop():
    """Fails if the sft stage is not planned inside each routed teacher's loop with loop-local buffers that its
    backward reads, or if the hybrid plan breaks the lifetime invariants."""
    from opdgraph.compile import compile_plan
    from opdgraph.config import load_pipeline
    from tests.test_composed_plans import PIPELINES, _schedule
    from tests.test_lifetime import check_invariants

    cfg = load_pipeline(PIPELINES / "tiny_routed.toml", ["sft.gold_prefix_field=solution",
                                                         "sft.gold_prefix_max_tokens=16"])
    plan = compile_plan(cfg)
    check_invariants(*_schedule(plan))
    names = [step.name for step in plan.steps]
    for group in ("chat", "math"):
        assert [name for name in names if name.startswith(f"{group}/")] == [
            f"{group}/loss.student_forward", f"{group}/loss", f"{group}/sft", f"{group}/backward"]
        assert f"{group}/sft.hidden_grad" in plan.step(f"{group}/backward").reads

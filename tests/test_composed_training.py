"""Several teachers, teacher-side context and self-distillation, checked against float64 references.

- The routed step: one training step of pipelines/tiny_routed.toml through the real PlanExecutor (only rollout is
  replaced by fixed token sequences whose rows carry a route); the gradient the optimizer is handed must equal a
  float64 reference that scores each row with its own teacher, computed separately per teacher on its rows (teacher
  forwards rerun here in float64 from the teachers' weights, not read from the runtime) and summed with the global
  token weights.
- The mixture divergence: chunked_divergence over two teachers against a float64 reference over the mixed
  distribution p_T = sum_k w_k p_Tk, for every divergence, loss and gradient.
- Context scoring: in pipelines/tiny_context.toml the teacher's hidden states equal the teacher's float64 forward
  over a hand-built sequence (the system message and the row's field placed by hand, then the same response).
"""

from __future__ import annotations

import pytest
import torch

from opdgraph.runtime import training
from opdgraph.runtime.batches import Sample
from opdgraph.train.divergence import chunked_divergence
from tests.training_harness import (
    PIPELINES,
    context,
    float64_copy,
    random_samples,
    relative_error,
    run_step,
    sequence_hidden,
)


def test_routed_step_equals_per_teacher_losses_summed(tmp_path, monkeypatch):
    """Fails if a row is scored by the wrong teacher, a teacher's micro-batches are skipped or run twice, the loss
    is normalised per teacher instead of over the whole step, or a group-local buffer is mixed up between loops."""
    cfg, plan, ctx = context(tmp_path, "tiny_routed.toml")
    samples = random_samples(10, ["chat", "math", "chat"])
    before = float64_copy(ctx.student)
    teachers = {name: float64_copy(teacher.model) for name, teacher in ctx.teachers.items()}
    handed = run_step(cfg, plan, ctx, samples, monkeypatch)

    total_tokens = sum(len(s.response_ids) for s in samples)
    vocab = before.config.vocab_size
    for stage, teacher in teachers.items():  # each teacher's loss on its own rows, computed separately
        for sample in (s for s in samples if s.route in ctx.teachers[stage].spec.routes):
            ids, positions = sample.prompt_ids + sample.response_ids, range(len(sample.prompt_ids) - 1,
                                                                            len(sample.prompt_ids) - 1
                                                                            + len(sample.response_ids))
            with torch.no_grad():
                teacher_logp = torch.log_softmax(sequence_hidden(teacher, ids, positions)
                                                 @ teacher.lm_head_weight[:vocab].T, dim=-1)
            student_logp = torch.log_softmax(sequence_hidden(before, ids, positions) @ before.lm_head_weight.T,
                                             dim=-1)
            reverse_kl = (student_logp.exp() * (student_logp - teacher_logp)).sum()
            (reverse_kl / total_tokens).backward()
    want = {name: param.grad for name, param in before.named_parameters()}
    error = relative_error(handed, want)
    assert error < 1e-5, error
    assert set(ctx.step_record) >= {"divergence[teacher_score.chat]", "divergence[teacher_score.math]"}


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "sampled_token"])
def test_mixture_divergence_equals_float64_over_the_mixed_distribution(divergence):
    """sum_i w_i D(p_S, sum_k w_k p_Tk) and its student-hidden gradient, against plain float64 autograd."""
    torch.manual_seed(0)
    positions, hidden, vocab, temperature = 13, 16, 40, 0.8
    student_hidden = torch.randn(positions, hidden)
    student_head = torch.randn(vocab, hidden) * 0.3
    teacher_hidden = [torch.randn(positions, 24), torch.randn(positions, 8)]
    teacher_heads = [torch.randn(vocab + 3, 24) * 0.3, torch.randn(vocab, 8) * 0.5]
    mixture, weights, beta = [0.25, 0.75], torch.rand(positions), 0.3
    sampled = torch.randint(0, vocab, (positions,))
    result = chunked_divergence(student_hidden, student_head, teacher_hidden, teacher_heads, weights,
                                divergence=divergence, beta=beta, temperature=temperature, chunk_tokens=5,
                                sampled_ids=sampled if divergence == "sampled_token" else None,
                                mixture_weights=mixture)

    hidden64 = student_hidden.double().requires_grad_(True)
    log_s = torch.log_softmax(hidden64 @ student_head.double().T / temperature, dim=-1)
    p_t = sum(w * torch.softmax(h.double() @ head.double()[:vocab].T / temperature, dim=-1)
              for w, h, head in zip(mixture, teacher_hidden, teacher_heads))
    log_t = p_t.log()
    if divergence == "forward_kl":
        per_token = (p_t * (log_t - log_s)).sum(-1)
    elif divergence == "reverse_kl":
        per_token = (log_s.exp() * (log_s - log_t)).sum(-1)
    elif divergence == "jsd":
        log_m = torch.log(beta * p_t + (1 - beta) * log_s.exp())
        per_token = beta * (p_t * (log_t - log_m)).sum(-1) + (1 - beta) * (log_s.exp() * (log_s - log_m)).sum(-1)
    else:
        chosen_s, chosen_t = log_s.gather(1, sampled[:, None])[:, 0], log_t.gather(1, sampled[:, None])[:, 0]
        per_token = (chosen_s - chosen_t).detach() * chosen_s
    loss = (per_token * weights.double()).sum()
    loss.backward()
    assert torch.allclose(result.loss.double(), loss, rtol=1e-5, atol=1e-6), (float(result.loss), float(loss))
    assert torch.allclose(result.hidden_grad.double(), hidden64.grad, rtol=1e-4, atol=1e-6)


def test_context_teacher_scores_the_hand_built_sequence(tmp_path, monkeypatch):
    """The teacher of tiny_context sees a system message and the row's category inside the user message; its hidden
    states at the response positions must equal a float64 forward of that sequence built by hand here."""
    import json

    from opdgraph.runtime.startup import check_startup

    cfg, plan, ctx = context(tmp_path, "tiny_context.toml")
    tokenizer = ctx.tokenizer
    records = check_startup(cfg).train_prompts.records[:4]
    config = cfg.stages["teacher_score"].config
    rows = [json.loads(line) for line in (PIPELINES / "data" / "tiny_train.jsonl").read_text().splitlines()[:4]]
    teacher64 = float64_copy(ctx.teacher)
    stored = []
    original = training.chunked_loss

    def recording_loss(config_, inputs):
        batch = inputs.loop.micro_batch
        stored.append((batch, inputs.values.get_item("teacher_hidden", batch.index).double()))
        original(config_, inputs)

    monkeypatch.setattr(training, "chunked_loss", recording_loss)
    generator = torch.Generator().manual_seed(5)
    fixed = [Sample(prompt_ids=list(record.prompt_ids), response_ids=torch.randint(3, 300, (6,),
                                                                                   generator=generator).tolist(),
                    prompt_index=index, sample_index=0,
                    teacher_prompt_ids={"teacher_score": list(record.teacher_prompt_ids["teacher_score"])})
             for index, record in enumerate(records)]
    run_step(cfg, plan, ctx, fixed, monkeypatch)
    got = torch.cat([hidden for _, hidden in stored])
    want = []
    for sample, record, row in zip(fixed, records, rows):
        hand_built = [{"role": "system", "content": config.system_prompt},
                      {"role": "user", "content": f"{record.messages[-1]['content']} (topic: {row['category']})"}]
        teacher_prompt = tokenizer.chat_ids(hand_built, add_generation_prompt=True)
        assert list(record.teacher_prompt_ids["teacher_score"]) == teacher_prompt
        ids = teacher_prompt + sample.response_ids
        first = len(teacher_prompt) - 1
        with torch.no_grad():
            want.append(sequence_hidden(teacher64, ids, range(first, first + len(sample.response_ids))))
    assert torch.allclose(got, torch.cat(want), rtol=1e-5, atol=1e-5)

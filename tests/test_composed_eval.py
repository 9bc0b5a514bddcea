"""Eval with several teachers, and the per-teacher divergences of mixture training, against float64 references.

- Routed eval (pipelines/tiny_routed.toml): the eval before training runs for real (the student's and the
  teachers' greedy answers); every row must be answered by its own routed teacher, and the record's overall KL and
  top-1 agreement and each teacher's `reverse_kl[<stage>]` (over its own rows) must equal float64 figures computed
  here from the models' weights over the very samples eval scored.
- Mixture eval (pipelines/tiny_mixture.toml): the overall figures are taken against p_T = sum_k w_k p_Tk, each
  teacher's against that teacher alone, over every row.
- Mixture training: one step's `divergence[<stage>]` equals each teacher's own reverse KL against the student over
  every response token (float64, global token mean), beside the mixture's `divergence`.
"""

from __future__ import annotations

import pytest
import torch

from opdgraph.runtime import eval_answers, evaluation
from opdgraph.runtime.executor import PlanExecutor
from tests.training_harness import context, float64_copy, random_samples, run_step, sequence_hidden

METRICS = ("reverse_kl", "forward_kl", "top1_agreement")


def _log_probs(model, sample, vocab: int) -> torch.Tensor:
    """float64 log-probabilities at the positions that predict the sample's response tokens."""
    ids = sample.prompt_ids + sample.response_ids
    first = len(sample.prompt_ids) - 1
    with torch.no_grad():
        hidden = sequence_hidden(model, ids, range(first, first + len(sample.response_ids)))
        return torch.log_softmax(hidden @ model.lm_head_weight[:vocab].T, dim=-1)


def _figures(log_s: torch.Tensor, log_t: torch.Tensor) -> dict[str, float]:
    """Summed (not averaged) reverse KL, forward KL and top-1 agreement over the rows of [N, V] log-probs."""
    return {"reverse_kl": float((log_s.exp() * (log_s - log_t)).sum()),
            "forward_kl": float((log_t.exp() * (log_t - log_s)).sum()),
            "top1_agreement": float((log_s.argmax(-1) == log_t.argmax(-1)).sum())}


def _eval_before(tmp_path, pipeline: str, monkeypatch):
    """Run the eval before training; returns (ctx, its record, the sample lists it scored in order, which teacher
    stage answered each prompt index)."""
    cfg, plan, ctx = context(tmp_path, pipeline)
    (tmp_path / "run").mkdir(parents=True, exist_ok=True)  # where the eval record goes (the run loop makes it)
    scored, answered = [], {}
    original_score, original_answers = evaluation._score, eval_answers._answers

    def recording_score(inputs, stage, samples):
        scored.append(list(samples))
        return original_score(inputs, stage, samples)

    def recording_answers(inputs, stage, engine, prompts, params, seed, teacher=None):
        for prompt in prompts:
            if teacher is not None:
                answered[prompt.index_in_step] = teacher.spec.stage
        return original_answers(inputs, stage, engine, prompts, params, seed, teacher)

    monkeypatch.setattr(evaluation, "_score", recording_score)
    monkeypatch.setattr(eval_answers, "_answers", recording_answers)
    PlanExecutor(plan, {name: stage.config for name, stage in cfg.stages.items()}, ctx,
                 release_hooks={}).run_before_training()
    (record,) = ctx.eval_records
    return ctx, record, scored, answered


def _scored_sets(scored: list) -> list[tuple[str, list]]:
    """(record key prefix, samples): eval scores the teachers' answers first, then the student's."""
    teacher_answers, student_answers = scored
    return [("teacher_text_", teacher_answers), ("", student_answers)]


def test_routed_eval_scores_each_row_with_its_own_teacher(tmp_path, monkeypatch):
    """Fails if an eval row is answered or scored by another teacher than its route names, if a teacher's figures
    are averaged over rows that are not its own, or if the overall figures are not the token mean over all rows."""
    ctx, record, scored, answered = _eval_before(tmp_path, "tiny_routed.toml", monkeypatch)
    teachers = {name: teacher for name, teacher in ctx.teachers.items()}
    routes = {p.index_in_step: p.record.route for p in evaluation._eval_prompts({"prompts": ctx.eval_prompts}, 4)}
    assert set(routes.values()) == {"chat", "math"}
    assert answered == {index: next(name for name, t in teachers.items() if route in t.spec.routes)
                        for index, route in routes.items()}
    student64 = float64_copy(ctx.student)
    teachers64 = {name: float64_copy(teacher.model) for name, teacher in teachers.items()}
    vocab = student64.config.vocab_size
    for prefix, samples in _scored_sets(scored):
        totals, tokens = dict.fromkeys(METRICS, 0.0), 0
        for name, teacher in teachers.items():
            rows = [s for s in samples if s.route in teacher.spec.routes]
            own = dict.fromkeys(METRICS, 0.0)
            for sample in rows:
                figures = _figures(_log_probs(student64, sample, vocab), _log_probs(teachers64[name], sample, vocab))
                own = {key: own[key] + figures[key] for key in METRICS}
            own_tokens = sum(len(s.response_ids) for s in rows)
            for key in METRICS:
                assert record[f"{prefix}{key}[{name}]"] == pytest.approx(own[key] / own_tokens, rel=1e-4, abs=1e-6)
                totals[key] += own[key]
            tokens += own_tokens
        for key in METRICS:
            assert record[f"{prefix}{key}"] == pytest.approx(totals[key] / tokens, rel=1e-4, abs=1e-6)


def test_mixture_eval_scores_against_the_mixture_and_each_teacher(tmp_path, monkeypatch):
    """Fails if eval compares a mixture pipeline's student with one teacher only, mixes the teachers with other
    weights than their mixture_weight, or reports a teacher's own figures over only some rows."""
    ctx, record, scored, _ = _eval_before(tmp_path, "tiny_mixture.toml", monkeypatch)
    student64 = float64_copy(ctx.student)
    teachers = list(ctx.teachers.values())
    teachers64 = [float64_copy(teacher.model) for teacher in teachers]
    vocab = student64.config.vocab_size
    for prefix, samples in _scored_sets(scored):
        tokens = sum(len(s.response_ids) for s in samples)
        mixed, own = dict.fromkeys(METRICS, 0.0), [dict.fromkeys(METRICS, 0.0) for _ in teachers]
        for sample in samples:
            log_s = _log_probs(student64, sample, vocab)
            each = [_log_probs(model, sample, vocab) for model in teachers64]
            p_t = sum(teacher.spec.mixture_weight * log_t.exp() for teacher, log_t in zip(teachers, each))
            figures = _figures(log_s, p_t.log())
            mixed = {key: mixed[key] + figures[key] for key in METRICS}
            for index, log_t in enumerate(each):
                figures = _figures(log_s, log_t)
                own[index] = {key: own[index][key] + figures[key] for key in METRICS}
        for key in METRICS:
            assert record[f"{prefix}{key}"] == pytest.approx(mixed[key] / tokens, rel=1e-4, abs=1e-6)
            for teacher, sums in zip(teachers, own):
                assert record[f"{prefix}{key}[{teacher.spec.stage}]"] == pytest.approx(sums[key] / tokens,
                                                                                       rel=1e-4, abs=1e-6)


def test_mixture_training_logs_each_teachers_divergence(tmp_path, monkeypatch):
    """Fails if mixture training logs only the mixture's divergence, or a teacher's divergence over other rows or
    with other weights than the loss's global token weights."""
    cfg, plan, ctx = context(tmp_path, "tiny_mixture.toml")
    samples = random_samples(6, [None])
    student64 = float64_copy(ctx.student)
    teachers = list(ctx.teachers.values())
    teachers64 = [float64_copy(teacher.model) for teacher in teachers]
    vocab = student64.config.vocab_size
    run_step(cfg, plan, ctx, samples, monkeypatch)
    tokens = sum(len(s.response_ids) for s in samples)
    own, mixed = [0.0 for _ in teachers], 0.0
    for sample in samples:
        log_s = _log_probs(student64, sample, vocab)
        each = [_log_probs(model, sample, vocab) for model in teachers64]
        for index, log_t in enumerate(each):
            own[index] += float((log_s.exp() * (log_s - log_t)).sum())
        p_t = sum(teacher.spec.mixture_weight * log_t.exp() for teacher, log_t in zip(teachers, each))
        mixed += float((log_s.exp() * (log_s - p_t.log())).sum())
    record = ctx.step_record
    assert record["divergence"] == pytest.approx(mixed / tokens, rel=1e-5)
    for teacher, total in zip(teachers, own):
        assert record[f"divergence[{teacher.spec.stage}]"] == pytest.approx(total / tokens, rel=1e-5)
    assert len({record[f"divergence[{teacher.spec.stage}]"] for teacher in teachers}) == len(teachers)

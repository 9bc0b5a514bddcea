"""The eval stage at run time: how far the student is from the teacher on held-out prompts.

The student answers the first `num_prompts` held-out prompts (greedy by default); the teacher scores those responses
at every response position. Reported, averaged over all response tokens: KL(student || teacher), KL(teacher ||
student) (temperature 1, full vocabulary) and the student's top-1 agreement with the teacher's argmax, both on the
student's responses and on the teacher's own responses (`teacher_text_*`), the mean response length, and, for
prompts carrying a reference answer, the accuracy of student and teacher answers. A few responses are shown side by
side with the teacher's own (the teacher answers with the same settings). The degeneration check
(opdgraph.runtime.degeneration: distinct-n, repeated runs, identical responses, and a warning when the student's
responses collapse) and, with `behaviour`, the behaviour rates (opdgraph.runtime.behaviour) are part of the record.

Student and teacher generate with eval engines of their own, whose KV pools, micro-batches and loss chunks are the
plan's eval facts (opdgraph.counts.eval_counts): the plan's `<eval>.kv_cache` and `<eval>.teacher_kv_cache`,
allocated by the eval step and freed after it through `release_hooks`, like rollout's pool.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

import attrs

from opdgraph.runtime.answer_scoring import is_correct
from opdgraph.runtime.batches import build_micro_batches
from opdgraph.runtime.behaviour import behaviour_rates
from opdgraph.runtime.degeneration import METRIC_KEYS, response_metrics, warning_line
from opdgraph.runtime.gold_prefix_eval import accuracy_with_gold_prefix
from opdgraph.runtime.rollout_step import generate_samples, sampling_params


def _eval_prompts(ctx, count: int):
    from opdgraph.data.sampler import SampledPrompt

    records = list(ctx.eval_prompts.records)[:count]
    return [SampledPrompt(record=r, prompt_index=i, index_in_step=i, epoch=0) for i, r in enumerate(records)]


def _eval_engine(ctx, stage: str, role: str):
    """The eval engine of `role` ("student" or "teacher"), built once with the plan's eval pool; its KV pool is
    allocated by generate() and dropped by the plan's release of `<stage>.kv_cache` / `<stage>.teacher_kv_cache`."""
    key = f"{stage}.{role}"
    if key not in ctx.eval_engines:
        from opdgraph.rollout import RolloutEngine
        from opdgraph.runtime import distributed, fsdp
        from opdgraph.runtime.engine_setup import AUTO_DECODE_BURST_STEPS, rollout_attention

        facts, rollout = ctx.plan.facts, ctx.facts["rollout_config"]
        model = ctx.student if role == "student" else ctx.teacher
        # Torch attention (the flashinfer path's graphs, workspaces and stacked weights are planned for rollout
        # only), but where rollout takes the GPU path, decode runs as eager bursts through the Triton decode kernel:
        # no host sync per token, and no memory beyond the eval workspace the plan lists.
        gpu = rollout_attention(rollout.backend, ctx.device, model.dtype, model.config.head_dim) == "flashinfer"
        # A teacher with more vocabulary rows than the student (padding, as Qwen2.5-7B's 152064 vs 1.5B's 151936)
        # answers in the shared vocabulary: ids beyond it are no tokens of the student's and never enter the loss.
        student_vocab = ctx.student.config.vocab_size
        vocab_limit = student_vocab if role == "teacher" and model.config.vocab_size > student_vocab else None
        pages = facts.get(f"{stage}.teacher_num_pages", facts[f"{stage}.num_pages"]) if role == "teacher" else \
            facts[f"{stage}.num_pages"]
        engine = RolloutEngine(model, page_size=rollout.page_size, num_pages=int(pages),
                               max_num_seqs=int(facts[f"{stage}.concurrent_seqs"]),
                               prefill_token_budget=rollout.prefill_token_budget, device=ctx.device, kv_dtype=None,
                               decode_burst_steps=AUTO_DECODE_BURST_STEPS if gpu else 1, vocab_limit=vocab_limit)
        if role == "student" and distributed.world_size() > 1:
            engine = fsdp.UnshardingEngine(engine, ctx.student)
        ctx.eval_engines[key] = engine
    return ctx.eval_engines[key]


EVAL_POOLS = {"student": "kv_cache", "teacher": "teacher_kv_cache"}  # engine role -> the plan's buffer suffix


def release_hooks(ctx, stage: str) -> dict:
    """The executor's release hooks of an eval stage's KV pools (as rollout's pool is released with the engine)."""
    def hook(role):
        def release():
            engine = ctx.eval_engines.get(f"{stage}.{role}")
            if engine is not None:
                engine.release()
        return release

    return {f"{stage}.{suffix}": hook(role) for role, suffix in EVAL_POOLS.items()}


def _eval_teacher(ctx):
    """Eval compares with the first teacher stage (in plan order)."""
    return next(iter(ctx.teachers.values()))


def _generate(ctx, stage: str, role: str, prompts, params, seed: int) -> list:
    """The student's or the teacher's answers; a teacher that sees another prompt answers that prompt, and its
    samples keep the student's prompt beside it (each model is scored on its own view)."""
    engine = _eval_engine(ctx, stage, role)
    teacher_stage = _eval_teacher(ctx).spec.stage
    own_prompt = role == "teacher" and any(teacher_stage in p.record.teacher_prompt_ids for p in prompts)
    asked = [attrs.evolve(p, record=attrs.evolve(p.record, prompt_ids=p.record.teacher_prompt_ids[teacher_stage]))
             for p in prompts] if own_prompt else prompts
    samples = generate_samples(engine, asked, params, n=1, seed=seed, step=ctx.step,
                               tag="eval" if role == "student" else "eval-teacher")
    if own_prompt:
        for sample in samples:
            sample.prompt_ids = list(prompts[sample.prompt_index].record.prompt_ids)
    ctx.buffers.put(f"{stage}.{EVAL_POOLS[role]}", engine.kv_cache)
    return samples


@torch.no_grad()
def _score(ctx, stage: str, samples) -> dict[str, float]:
    from opdgraph.train.divergence import divergence_metrics

    tokens = sum(len(s.response_ids) for s in samples)
    sums = {"reverse_kl": 0.0, "forward_kl": 0.0, "top1_agreement": 0.0}
    for batch in build_micro_batches(samples, micro_batch_tokens=int(ctx.plan.facts[f"{stage}.micro_batch_tokens"]),
                                     normalize="token", global_tokens=tokens, global_sequences=len(samples),
                                     device=ctx.device):
        student = ctx.student.forward_hidden(batch.input_ids, batch.positions, batch.meta)
        view = batch.view_for(_eval_teacher(ctx).spec.stage)
        teacher = ctx.teacher.forward_hidden(view.input_ids, view.positions, view.meta)
        metrics = divergence_metrics(student.index_select(0, batch.loss_positions), ctx.student.lm_head_weight,
                                     teacher.index_select(0, view.loss_positions), ctx.teacher.lm_head_weight,
                                     chunk_tokens=int(ctx.plan.facts[f"{stage}.chunk_tokens"]))
        sums["reverse_kl"] += float(metrics.reverse_kl.sum())
        sums["forward_kl"] += float(metrics.forward_kl.sum())
        sums["top1_agreement"] += float(metrics.top1_agree.float().sum())
    return {key: value / max(tokens, 1) for key, value in sums.items()}


def _accuracy(ctx, samples) -> float | None:
    graded = [s for s in samples if s.answer is not None]
    if not graded:
        return None
    text = ctx.tokenizer.decode
    return sum(is_correct(text(s.response_ids), str(s.answer)) for s in graded) / len(graded)


@contextmanager
def _teacher_on_device(ctx):
    """Eval runs outside teacher scoring, where an offloading plan keeps the teacher's weights on the host."""
    offloader = ctx.teacher_offloader
    swap = offloader.swap_for(_eval_teacher(ctx).weights_buffer) if offloader is not None else None
    if swap is None:
        yield
        return
    swap.to_device()
    try:
        yield
    finally:
        swap.to_host()


def run_eval(config, ctx, *, stage: str, label: str) -> dict:
    """Evaluate now; writes an `eval` record to metrics.jsonl and returns it. The plan's release of the eval step
    (the executor's, or the caller's for the eval before training) frees the eval KV pools."""
    with _teacher_on_device(ctx):
        return _run_eval(config, ctx, stage=stage, label=label)


def _run_eval(config, ctx, *, stage: str, label: str) -> dict:
    from opdgraph.data.sampler import mix_seed

    # Eval draws its own randomness: training seeds come from (seed, step, prompt index) and must not repeat here.
    eval_seed = mix_seed("eval", ctx.seed)
    prompts = _eval_prompts(ctx, config.num_prompts)
    params = sampling_params(ctx.facts["rollout_config"], max_new_tokens=config.max_new_tokens,
                             greedy=config.greedy, eos_token_ids=ctx.tokenizer.eos_token_ids)
    student_samples = _generate(ctx, stage, "student", prompts, params, eval_seed)
    teacher_samples = _generate(ctx, stage, "teacher", prompts, params, eval_seed)
    lengths = [len(s.response_ids) for s in student_samples]
    # On the student's own samples (what OPD optimises) and on the teacher's responses: a student that only learns
    # to produce text the teacher finds predictable improves the first but not the second.
    on_teacher_text = {f"teacher_text_{key}": value for key, value in _score(ctx, stage, teacher_samples).items()}
    on_own_text = _score(ctx, stage, student_samples)
    record = {"kind": "eval", "label": label, "step": ctx.step, **on_own_text, **on_teacher_text,
              "response_length_mean": sum(lengths) / len(lengths), "num_prompts": len(prompts)}
    student_accuracy, teacher_accuracy = _accuracy(ctx, student_samples), _accuracy(ctx, teacher_samples)
    if student_accuracy is not None:
        record.update({"accuracy": student_accuracy, "teacher_accuracy": teacher_accuracy})
    record.update(accuracy_with_gold_prefix(  # hybrid SFT: also from each prompt's gold prefix
        ctx, prompts, lambda placed: _generate(ctx, stage, "student", placed, params, eval_seed)))
    decode, eos = ctx.tokenizer.decode, ctx.tokenizer.eos_token_ids
    for prefix, samples in (("", student_samples), ("teacher_", teacher_samples)):
        record.update(response_metrics([s.response_ids for s in samples], end_ids=eos, prefix=prefix))
    if config.behaviour is not None:
        texts = [[decode([t for t in s.response_ids if t not in eos]) for s in samples]
                 for samples in (student_samples, teacher_samples)]
        record.update(behaviour_rates(config.behaviour, *texts))
    ctx.metrics.write(record)
    shown = [{"label": label, "prompt": decode(s.prompt_ids), "student": decode(s.response_ids),
              "teacher": decode(t.response_ids)}
             for s, t in zip(student_samples[:config.num_samples_to_show], teacher_samples)]
    ctx.metrics.write_samples(ctx.step, shown)
    _print(record, shown, next((r for r in ctx.eval_records if r["label"] == "before"), None))
    return record


def _print(record: dict, shown: list[dict], before: dict | None) -> None:
    keys = ("reverse_kl", "forward_kl", "top1_agreement", "response_length_mean", "accuracy",
            "accuracy_with_gold_prefix", "behaviour_rate",
            "distinct_2", "repeat_run_mean", "identical_share")
    values = "  ".join(f"{k} {record[k]:.4f}" for k in keys if k in record)
    print(f"\neval ({record['label']}, step {record['step']}): {values}")
    if warning_line(record, before):
        print(warning_line(record, before))
    for sample in shown:
        print(f"  prompt : {sample['prompt'][-200:]!r}\n  student: {sample['student'][:200]!r}\n"
              f"  teacher: {sample['teacher'][:200]!r}")


def print_before_after(first: dict, last: dict) -> None:
    """The table a user reads at the end of a run: held-out metrics before and after training."""
    keys = [k for k in ("reverse_kl", "forward_kl", "top1_agreement", "teacher_text_reverse_kl",
                        "teacher_text_forward_kl", "teacher_text_top1_agreement", "response_length_mean", "accuracy",
                        "accuracy_with_gold_prefix",
                        "behaviour_rate", "teacher_behaviour_rate", *METRIC_KEYS,
                        *(f"teacher_{key}" for key in METRIC_KEYS))
            if k in first and k in last]
    print(f"\n{'held-out metric':<30}{'before':>12}{'after':>12}")
    for key in keys:
        print(f"{key:<30}{first[key]:>12.4f}{last[key]:>12.4f}")
    if warning_line(last, first):
        print(warning_line(last, first))

"""Eval's answers: the student's and the teachers' responses to the held-out prompts, from eval engines of their own.

Student and teacher generate with eval engines of their own, whose KV pools and concurrency are the plan's eval facts
(opdgraph.counts.eval_counts, which also sizes evaluation's scoring micro-batches and loss chunks): the plan's
`<eval>.kv_cache` and `<eval>.teacher_kv_cache`, allocated by the eval step and freed after it through
`release_hooks`, like rollout's pool. Routed teachers answer one after another, each one's pool dropped before the
next one's is made. A teacher that sees another prompt than
the student answers its own. opdgraph.runtime.evaluation scores what these return.
"""

from __future__ import annotations

import attrs

from opdgraph.runtime.eval_teachers import _on_device, _routed, _teacher_of, _teachers
from opdgraph.runtime.rollout_step import generate_samples


def _engine_key(stage: str, role: str, teacher=None, routed: bool = False) -> str:
    return f"{stage}.{role}" + (f"[{teacher.spec.stage}]" if routed else "")


def _eval_engine(inputs, stage: str, role: str, teacher=None):
    """The eval engine of `role` ("student" or "teacher", whose model is `teacher`'s), built once with the plan's
    eval pool; its KV pool is allocated by generate() and dropped by the plan's release of `<stage>.kv_cache` /
    `<stage>.teacher_kv_cache`."""
    engines, models = inputs.models["engines"], inputs.models
    key = _engine_key(stage, role, teacher, routed=role == "teacher" and _routed(inputs))
    if key not in engines:
        from opdgraph.rollout import RolloutEngine
        from opdgraph.runtime import distributed, fsdp
        from opdgraph.runtime.engine_setup import AUTO_DECODE_BURST_STEPS, rollout_attention

        facts, rollout, device = models["plan_facts"], inputs.run.facts["rollout_config"], inputs.run.device
        student = models["student"]
        model = student if role == "student" else teacher.model
        # Torch attention (the flashinfer path's graphs, workspaces and stacked weights are planned for rollout
        # only), but where rollout takes the GPU path, decode runs as eager bursts through the Triton decode kernel:
        # no host sync per token, and no memory beyond the eval workspace the plan lists.
        gpu = rollout_attention(rollout.backend, device, model.dtype, model.config.head_dim) == "flashinfer"
        # A teacher with more vocabulary rows than the student (padding, as Qwen2.5-7B's 152064 vs 1.5B's 151936)
        # answers in the shared vocabulary: ids beyond it are no tokens of the student's and never enter the loss.
        student_vocab = student.config.vocab_size
        vocab_limit = student_vocab if role == "teacher" and model.config.vocab_size > student_vocab else None
        pages = facts.get(f"{stage}.teacher_num_pages", facts[f"{stage}.num_pages"]) if role == "teacher" else \
            facts[f"{stage}.num_pages"]
        engine = RolloutEngine(model, page_size=rollout.page_size, num_pages=int(pages),
                               max_num_seqs=int(facts[f"{stage}.concurrent_seqs"]),
                               prefill_token_budget=rollout.prefill_token_budget, device=device, kv_dtype=None,
                               decode_burst_steps=AUTO_DECODE_BURST_STEPS if gpu else 1, vocab_limit=vocab_limit)
        if role == "student" and distributed.world_size() > 1:
            engine = fsdp.UnshardingEngine(engine, student)
        engines[key] = engine
    return engines[key]


EVAL_POOLS = {"student": "kv_cache", "teacher": "teacher_kv_cache"}  # engine role -> the plan's buffer suffix


def release_hooks(engines: dict, stage: str) -> dict:
    """The executor's release hooks of an eval stage's KV pools (as rollout's pool is released with the engine): the
    teacher pool's releases every teacher engine of the stage (routed teachers have one each)."""
    def hook(role):
        def release():
            for key, engine in engines.items():
                if key == f"{stage}.{role}" or key.startswith(f"{stage}.{role}["):
                    engine.release()
        return release

    return {f"{stage}.{suffix}": hook(role) for role, suffix in EVAL_POOLS.items()}


def _answers(inputs, stage: str, engine, prompts, params, seed: int, teacher=None) -> list:
    """The student's (teacher None) or a teacher's answers; a teacher that sees another prompt answers that prompt,
    and its samples keep the student's prompt beside it (each model is scored on its own view)."""
    own_prompt = teacher is not None and any(teacher.spec.stage in p.record.teacher_prompt_ids for p in prompts)
    asked = [attrs.evolve(p, record=attrs.evolve(p.record, prompt_ids=p.record.teacher_prompt_ids[teacher.spec.stage]))
             for p in prompts] if own_prompt else prompts
    samples = generate_samples(engine, asked, params, n=1, seed=seed, step=inputs.run.step,
                               tag="eval" if teacher is None else "eval-teacher")
    if own_prompt:
        by_index = {p.index_in_step: p for p in prompts}
        for sample in samples:
            sample.prompt_ids = list(by_index[sample.prompt_index].record.prompt_ids)
    return samples


def _generate_student(inputs, stage: str, prompts, params, seed: int) -> list:
    engine = _eval_engine(inputs, stage, "student")
    samples = _answers(inputs, stage, engine, prompts, params, seed)
    inputs.values.put(f"{stage}.{EVAL_POOLS['student']}", engine.kv_cache)
    return samples


def _generate_teachers(inputs, stage: str, prompts, params, seed: int) -> list:
    """Each row answered by its teacher (the first, unless rows are routed); routed teachers one after another,
    each brought onto the device for its turn and its pool dropped before the next one's."""
    if not _routed(inputs):
        engine = _eval_engine(inputs, stage, "teacher", _teachers(inputs)[0])
        samples = _answers(inputs, stage, engine, prompts, params, seed, _teachers(inputs)[0])
        inputs.values.put(f"{stage}.{EVAL_POOLS['teacher']}", engine.kv_cache)
        return samples
    turns = [(teacher, [p for p in prompts if _teacher_of(inputs, p.record) is teacher])
             for teacher in _teachers(inputs)]
    turns = [(teacher, rows) for teacher, rows in turns if rows]
    samples = []
    for number, (teacher, rows) in enumerate(turns):
        engine = _eval_engine(inputs, stage, "teacher", teacher)
        with _on_device(inputs, [teacher]):
            samples += _answers(inputs, stage, engine, rows, params, seed, teacher)
        if number < len(turns) - 1:
            engine.release()
        else:
            inputs.values.put(f"{stage}.{EVAL_POOLS['teacher']}", engine.kv_cache)
    return sorted(samples, key=lambda sample: sample.prompt_index)

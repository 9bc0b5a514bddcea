"""The eval stage at run time: how far the student is from the teacher on held-out prompts.

The student answers the first `num_prompts` held-out prompts (greedy by default); the teacher scores those responses
at every response position. Reported, averaged over all response tokens: KL(student || teacher), KL(teacher ||
student) (temperature 1, full vocabulary) and the student's top-1 agreement with the teacher's argmax, both on the
student's responses and on the teacher's own responses (`teacher_text_*`), the mean response length, and, for
prompts carrying a reference answer, the accuracy of student and teacher answers. A few responses are shown side by
side with the teacher's own (the teacher answers with the same settings). The degeneration check
(opdgraph.runtime.degeneration: distinct-n, repeated runs, identical responses, and a warning when the student's
responses collapse) and, with `behaviour`, the behaviour rates (opdgraph.runtime.behaviour) are part of the record.

Several teachers (opdgraph.teachers): with routed rows each eval row is answered and scored by its own teacher (the
row's route field picks it, as in training); with a mixture the student is scored against the mixture p_T =
sum_k w_k p_Tk, and the teacher's answers are the first teacher's (plan order; no engine samples a mixture). Either
way the record also holds each teacher's own figures, `reverse_kl[<teacher stage>]` (and forward_kl,
top1_agreement, with teacher_text_ in front for the teachers' answers): a routed teacher's over its own rows, a
mixture's teachers' over every row.

Student and teacher generate with eval engines of their own, whose KV pools, micro-batches and loss chunks are the
plan's eval facts (opdgraph.counts.eval_counts): the plan's `<eval>.kv_cache` and `<eval>.teacher_kv_cache`,
allocated by the eval step and freed after it through `release_hooks`, like rollout's pool. Routed teachers answer
one after another, each one's pool dropped before the next one's is made.

The eval stage binds (opdgraph.stages.eval.bind) what it uses: the student, the teacher stages, the tokenizer, the
eval prompts, the run's eval engines, the offloader and the plan's facts; each function here takes the stage's
StageInputs (opdgraph.runtime.stage_inputs).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch

import attrs

from opdgraph.runtime.answer_scoring import is_correct
from opdgraph.runtime.batches import build_micro_batches
from opdgraph.runtime.behaviour import behaviour_rates
from opdgraph.runtime.degeneration import METRIC_KEYS, response_metrics, warning_line
from opdgraph.runtime.gold_prefix_eval import accuracy_with_gold_prefix
from opdgraph.runtime.rollout_step import generate_samples, sampling_params


def _eval_prompts(models: dict, count: int):
    from opdgraph.data.sampler import SampledPrompt

    records = list(models["prompts"].records)[:count]
    return [SampledPrompt(record=r, prompt_index=i, index_in_step=i, epoch=0) for i, r in enumerate(records)]


def _teachers(inputs) -> list:
    """The teacher stages (TeacherRuntime), in plan order."""
    return list(inputs.models["teachers"].values())


def _routed(inputs) -> bool:
    """Each row has a teacher of its own (loss.route_field with several teachers)."""
    return len(inputs.models["teachers"]) > 1 and "route_groups" in inputs.run.facts


def _teacher_of(inputs, record):
    """The teacher that answers and scores a row: its routed one, else the first."""
    teachers = _teachers(inputs)
    if not _routed(inputs):
        return teachers[0]
    return next(teacher for teacher in teachers if record.route in teacher.spec.routes)


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


METRICS = ("reverse_kl", "forward_kl", "top1_agreement")


def _sums(inputs, stage: str, samples, teachers: list, mixture: bool) -> tuple[dict, dict]:
    """Summed metrics of `samples` against `teachers` (the mixture of them, or the one), and each teacher's own
    sums when there are several: ({metric: sum}, {teacher stage: {metric: sum}})."""
    from opdgraph.train.divergence import divergence_metrics

    facts, student, device = inputs.models["plan_facts"], inputs.models["student"], inputs.run.device
    tokens = sum(len(s.response_ids) for s in samples)
    sums = dict.fromkeys(METRICS, 0.0)
    each = {teacher.spec.stage: dict.fromkeys(METRICS, 0.0) for teacher in teachers} if mixture else {}
    chunk_tokens = int(facts[f"{stage}.chunk_tokens"])
    budgets = {"tokens": int(facts[f"{stage}.micro_batch_tokens"]),  # what the plan sized a scoring micro-batch by
               **{f"teacher:{teacher.spec.stage}": int(facts[f"{stage}.teacher_forward_tokens"]) for teacher in teachers}}
    for batch in build_micro_batches(samples, budgets=budgets,
                                     normalize="token", global_tokens=tokens, global_sequences=len(samples),
                                     device=device):
        hidden = student.forward_hidden(batch.input_ids, batch.positions, batch.meta)
        hidden = hidden.index_select(0, batch.loss_positions)
        teacher_hidden = []
        for teacher in teachers:
            view = batch.view_for(teacher.spec.stage)
            scored = teacher.model.forward_hidden(view.input_ids, view.positions, view.meta)
            teacher_hidden.append(scored.index_select(0, view.loss_positions))
        heads = [teacher.model.lm_head_weight for teacher in teachers]
        if mixture:
            metrics = divergence_metrics(hidden, student.lm_head_weight, teacher_hidden, heads,
                                         chunk_tokens=chunk_tokens,
                                         mixture_weights=[teacher.spec.mixture_weight for teacher in teachers])
        else:
            metrics = divergence_metrics(hidden, student.lm_head_weight, teacher_hidden[0], heads[0],
                                         chunk_tokens=chunk_tokens)
        _add(sums, metrics)
        for teacher, own_hidden, head in zip(teachers, teacher_hidden, heads) if mixture else ():
            _add(each[teacher.spec.stage], divergence_metrics(hidden, student.lm_head_weight, own_hidden, head,
                                                               chunk_tokens=chunk_tokens))
    return sums, each


def _add(sums: dict, metrics) -> None:
    sums["reverse_kl"] += float(metrics.reverse_kl.sum())
    sums["forward_kl"] += float(metrics.forward_kl.sum())
    sums["top1_agreement"] += float(metrics.top1_agree.float().sum())


@torch.no_grad()
def _score(inputs, stage: str, samples) -> dict[str, float]:
    """Token means over `samples`: against each row's teacher (routed), the mixture, or the one teacher; with several
    teachers also `<metric>[<teacher stage>]`, each teacher's own (a routed one's over its rows only)."""
    teachers = _teachers(inputs)
    tokens = sum(len(s.response_ids) for s in samples)
    if not _routed(inputs):
        mixture = len(teachers) > 1
        sums, each = _sums(inputs, stage, samples, teachers if mixture else teachers[:1], mixture)
        scores = {key: value / max(tokens, 1) for key, value in sums.items()}
        scores.update({f"{key}[{name}]": value / max(tokens, 1) for name, own in each.items()
                       for key, value in own.items()})
        return scores
    totals, scores = dict.fromkeys(METRICS, 0.0), {}
    for teacher in teachers:
        rows = [s for s in samples if _teacher_of(inputs, s) is teacher]
        if not rows:
            continue
        with _on_device(inputs, [teacher]):
            sums, _ = _sums(inputs, stage, rows, [teacher], mixture=False)
        own_tokens = sum(len(s.response_ids) for s in rows)
        for key, value in sums.items():
            totals[key] += value
            scores[f"{key}[{teacher.spec.stage}]"] = value / max(own_tokens, 1)
    return {**{key: value / max(tokens, 1) for key, value in totals.items()}, **scores}


def _accuracy(tokenizer, samples) -> float | None:
    graded = [s for s in samples if s.answer is not None]
    if not graded:
        return None
    text = tokenizer.decode
    return sum(is_correct(text(s.response_ids), str(s.answer)) for s in graded) / len(graded)


@contextmanager
def _on_device(inputs, teachers: list):
    """Eval runs outside teacher scoring, where an offloading plan keeps the teachers' weights on the host: bring
    `teachers` in (a sharded teacher is gathered), and back out after."""
    offloader = inputs.models["offloader"]
    swaps = [offloader.swap_for(teacher.weights_buffer) for teacher in teachers] if offloader is not None else []
    with ExitStack() as stack:
        for swap in dict.fromkeys(swap for swap in swaps if swap is not None):
            swap.to_device()
            stack.callback(swap.to_host)
        yield


def run_eval(config, inputs, *, label: str) -> dict:
    """Evaluate now; writes an `eval` record to metrics.jsonl and returns it. The plan's release of the eval step
    (the executor applies it, also for the eval before training) frees the eval KV pools."""
    if _routed(inputs):  # each teacher comes in for its own turn
        return _run_eval(config, inputs, label=label)
    teachers = _teachers(inputs)
    with _on_device(inputs, teachers if len(teachers) > 1 else teachers[:1]):
        return _run_eval(config, inputs, label=label)


def _run_eval(config, inputs, *, label: str) -> dict:
    from opdgraph.data.sampler import mix_seed

    run, stage, tokenizer = inputs.run, inputs.step.stage, inputs.models["tokenizer"]
    # Eval draws its own randomness: training seeds come from (seed, step, prompt index) and must not repeat here.
    eval_seed = mix_seed("eval", run.seed)
    prompts = _eval_prompts(inputs.models, config.num_prompts)
    params = sampling_params(run.facts["rollout_config"], max_new_tokens=config.max_new_tokens,
                             greedy=config.greedy, eos_token_ids=tokenizer.eos_token_ids)
    student_samples = _generate_student(inputs, stage, prompts, params, eval_seed)
    teacher_samples = _generate_teachers(inputs, stage, prompts, params, eval_seed)
    lengths = [len(s.response_ids) for s in student_samples]
    # On the student's own samples (what OPD optimises) and on the teacher's responses: a student that only learns
    # to produce text the teacher finds predictable improves the first but not the second.
    on_teacher_text = {f"teacher_text_{key}": value for key, value in _score(inputs, stage, teacher_samples).items()}
    on_own_text = _score(inputs, stage, student_samples)
    record = {"kind": "eval", "label": label, "step": run.step, **on_own_text, **on_teacher_text,
              "response_length_mean": sum(lengths) / len(lengths), "num_prompts": len(prompts)}
    student_accuracy, teacher_accuracy = _accuracy(tokenizer, student_samples), _accuracy(tokenizer, teacher_samples)
    if student_accuracy is not None:
        record.update({"accuracy": student_accuracy, "teacher_accuracy": teacher_accuracy})
    record.update(accuracy_with_gold_prefix(  # hybrid SFT: also from each prompt's gold prefix
        run.facts.get("sft"), tokenizer, prompts,
        lambda placed: _generate_student(inputs, stage, placed, params, eval_seed)))
    decode, eos = tokenizer.decode, tokenizer.eos_token_ids
    for prefix, samples in (("", student_samples), ("teacher_", teacher_samples)):
        record.update(response_metrics([s.response_ids for s in samples], end_ids=eos, prefix=prefix))
    if config.behaviour is not None:
        texts = [[decode([t for t in s.response_ids if t not in eos]) for s in samples]
                 for samples in (student_samples, teacher_samples)]
        record.update(behaviour_rates(config.behaviour, *texts))
    run.metrics.write(record)
    shown = [{"label": label, "prompt": decode(s.prompt_ids), "student": decode(s.response_ids),
              "teacher": decode(t.response_ids)}
             for s, t in zip(student_samples[:config.num_samples_to_show], teacher_samples)]
    run.metrics.write_samples(run.step, shown)
    _print(record, shown, next((r for r in run.eval_records if r["label"] == "before"), None))
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

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

Student and teacher answer with eval engines of their own (opdgraph.runtime.eval_answers, which also holds the
release hooks of their KV pools); which teacher a row belongs to, and bringing teachers onto the device, is
opdgraph.runtime.eval_teachers. This module scores the answers, writes the record and prints it.

The eval stage binds (opdgraph.stages.eval.bind) what it uses: the student, the teacher stages, the tokenizer, the
eval prompts, the run's eval engines, the offloader and the plan's facts; each function here takes the stage's
StageInputs (opdgraph.runtime.stage_inputs).
"""

from __future__ import annotations

import torch

from opdgraph.runtime.answer_scoring import is_correct
from opdgraph.runtime.batches import build_micro_batches
from opdgraph.runtime.behaviour import behaviour_rates
from opdgraph.runtime.degeneration import METRIC_KEYS, response_metrics, warning_line
from opdgraph.runtime.eval_answers import _generate_student, _generate_teachers
from opdgraph.runtime.eval_teachers import _on_device, _routed, _teacher_of, _teachers
from opdgraph.runtime.gold_prefix_eval import accuracy_with_gold_prefix
from opdgraph.runtime.rollout_step import sampling_params


def _eval_prompts(models: dict, count: int):
    from opdgraph.data.sampler import SampledPrompt

    records = list(models["prompts"].records)[:count]
    return [SampledPrompt(record=r, prompt_index=i, index_in_step=i, epoch=0) for i, r in enumerate(records)]


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

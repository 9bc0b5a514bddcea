"""Eval stage: greedy (or sampled) generations on held-out prompts, scored against the teacher, shown as samples.

Reads `student_weights` (after the optimizer step), writes `eval_metrics`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import attrs

from opdgraph import sizing
from opdgraph import work as W
from opdgraph.config.fields import non_negative, positive, setting
from opdgraph.drafts import WHOLE_TEACHER, Draft, buffer
from opdgraph.plan import Buffer

if TYPE_CHECKING:  # the compiler's facts and the runtime's inputs; types only, so importing a stage stays light
    from opdgraph.runtime.stage_inputs import StageInputs
    from opdgraph.stage_plan import StageFacts

READS = ("student_weights",)
WRITES = ("eval_metrics",)
PERIODIC = True  # runs every n steps: not part of one training step's time
GATHERS_TEACHER = True  # generates with the whole teacher: a sharded teacher is all-gathered for it


@attrs.frozen(kw_only=True)
class Config:
    every_n_steps: int = setting(0, help="evaluate every n steps (0 = only before and after training)",
                                 check=non_negative)
    files: list[str] | None = setting(None, help="prompt files (default: data.eval_files)")
    num_prompts: int = setting(32, help="prompts evaluated", check=positive)
    max_new_tokens: int | None = setting(None, help="most tokens per response (default: rollout.max_new_tokens)",
                                         check=positive)
    greedy: bool = setting(True, help="argmax decoding (false: sample like rollout)")
    num_samples_to_show: int = setting(3, help="responses printed/logged per evaluation", check=non_negative)
    behaviour: Literal["french", "uppercase"] | None = setting(
        None, help="also report behaviour_rate / teacher_behaviour_rate: the share of answers showing it "
                   "(detectors: opdgraph.runtime.behaviour)")


def plan_steps(stage_name: str, config: Config, facts: StageFacts) -> list[Draft]:
    """One step that generates and scores; it allocates its own pools and workspace and frees them after."""
    shape, counts = facts.student_shape, facts.counts
    work = W.decode_work(shape, sequences=config.num_prompts,
                         concurrent_seqs=facts.eval_counts(stage_name).concurrent_seqs,
                         prompt_tokens=counts.prompt_tokens, new_tokens=config.max_new_tokens,
                         weight_bytes=facts.student_weight_bytes,
                         kv_bytes_per_token=shape.kv_bytes_per_token(facts.student_dtype_bytes),
                         hardware=facts.hardware)
    allocated = (f"{stage_name}.kv_cache", f"{stage_name}.teacher_kv_cache", f"{stage_name}.workspace",
                 *((f"{stage_name}.gathered_weights",) if facts.world_size > 1 else ()))
    return [Draft(stage_name, stage_name, "eval", (f"{facts.student}.weights",), allocated, (), 1, work,
                  frozenset({WHOLE_TEACHER}))]


def plan_facts(stage_name: str, config: Config, facts: StageFacts) -> dict[str, int]:
    """The eval pool and batch sizes the runtime builds its engines from, shown in the plan."""
    return facts.eval_counts(stage_name).facts()


def plan_buffers(stage_name: str, config: Config, facts: StageFacts) -> list[Buffer]:
    """What an eval allocates (opdgraph.runtime.evaluation), all freed after the eval step: a KV pool for the
    student's answers and one for the teacher's (each engine's, sized by counts.eval_counts), and one workspace for
    the larger of its two phases: generating, and scoring both models' answers in micro-batches."""
    counts, names = facts.eval_counts(stage_name), facts.stage_names
    shapes = {"student": facts.student_shape, "teacher": facts.teacher_shape}
    dtypes = {"student": facts.student_dtype_bytes, "teacher": facts.teacher_dtype_bytes}
    rollout = names["rollout"]
    pool_keys = (f"{stage_name}.num_prompts", f"{rollout}.max_num_seqs", "data.max_prompt_tokens",
                 f"{stage_name}.max_new_tokens", f"{rollout}.page_size")
    generate = max(sizing.forward_workspace_bytes(shapes[role], facts.prefill_token_budget, dtypes[role])
                   + sizing.decode_logits_bytes(counts.concurrent_seqs, shapes[role].vocab) for role in shapes)
    upcast = facts.cpu_upcast_hidden
    metrics = sizing.logit_chunk_bytes(counts.chunk_tokens, shapes["student"].vocab,
                                       sizing.EVAL_METRICS_LOGIT_BUFFERS, upcast_hidden=upcast)
    metrics_formula = f"chunk x V_student x {sizing.EVAL_METRICS_LOGIT_BUFFERS} x 4 (metrics)" + (
        " + V_student x (h_s + h_t) x 4 (fp32 lm_heads on CPU)" if upcast else "")
    score = (sum(sizing.hidden_state_bytes(shapes[role], counts.micro_batch_tokens, dtypes[role]) for role in shapes)
             + max(sizing.forward_workspace_bytes(shapes[role], counts.micro_batch_tokens, dtypes[role],
                                                  facts.reference_tokens(role, counts.sequence_tokens))
                   for role in shapes) + metrics)
    all_keys = (*pool_keys, f"{rollout}.prefill_token_budget", f"{names['teacher_score']}.micro_batch_tokens",
                f"{names['loss']}.chunk_tokens", "pipeline.device", *facts.student_keys, *facts.teacher_keys)
    buffers = [
        buffer(f"{stage_name}.kv_cache", "kv_cache",
               sizing.kv_cache_bytes(shapes["student"], counts.num_pages, counts.page_size, dtypes["student"])
               + sizing.recurrent_state_bytes(shapes["student"], counts.concurrent_seqs, dtypes["student"]),
               (*pool_keys, *facts.student_keys),
               formula="eval pages x page_size x L x 2 x kv x d; eval pages = min(num_prompts, max_num_seqs) x "
                       "ceil((max_prompt_tokens + max_new_tokens) / page_size)"),
        buffer(f"{stage_name}.teacher_kv_cache", "kv_cache",
               sizing.kv_cache_bytes(shapes["teacher"], counts.teacher_num_pages, counts.page_size,
                                     dtypes["teacher"])
               + sizing.recurrent_state_bytes(shapes["teacher"], counts.concurrent_seqs, dtypes["teacher"]),
               (*pool_keys, *facts.teacher_keys),
               formula="eval pages x page_size x L_teacher x 2 x kv_teacher x d_teacher (the teacher's answers)" + (
                   "; its pages count the teacher's own, longer prompts" if counts.teacher_num_pages
                   != counts.num_pages else "")),
        buffer(f"{stage_name}.workspace", "workspace", max(generate, score), all_keys,
               formula="max(prefill forward workspace + eval seqs x V x 4 of either model, "
                       "eval micro-batch tokens x (h_s d_s + h_t d_t) + larger forward workspace + "
                       f"{metrics_formula})"),
    ]
    if facts.world_size > 1:  # the sharded student generates on gathered weights (scoring gathers one layer at a time)
        buffers.append(buffer(f"{stage_name}.gathered_weights", "weights",
                              sizing.parameter_bytes(shapes["student"], dtypes["student"]), facts.student_keys,
                              formula="P x d (all-gathered for eval generation)"))
    return buffers


def bind(stage_name: str, config: Config, run) -> dict:
    """What an eval uses (opdgraph.runtime.evaluation): the student, the teacher stages, the tokenizer, the eval
    prompts, the run's eval engines (built at the first eval), the offloader that brings teachers in, the plan's
    eval facts."""
    return {"student": run.student, "teachers": run.teachers, "tokenizer": run.tokenizer,
            "prompts": run.eval_prompts, "engines": run.eval_engines, "offloader": run.teacher_offloader,
            "plan_facts": run.plan.facts}


def release_hooks(stage_name: str, config: Config, models: dict) -> dict:
    """The plan's releases of the eval pools drop the eval engines' pools."""
    from opdgraph.runtime.evaluation import release_hooks as pool_hooks

    return pool_hooks(models["engines"], stage_name)


def before_training(step, config: Config, inputs: StageInputs) -> bool:
    """The evaluation before the first training step (the `before` of the before/after table); True when it ran."""
    if inputs.models["prompts"] is None:
        return False
    from opdgraph.runtime.evaluation import run_eval

    inputs.run.eval_records.append(run_eval(config, inputs, label="before"))
    return True


def execute(step, config: Config, inputs: StageInputs) -> None:
    """Periodic: every `every_n_steps` training steps and after the last one (the run also evaluates before)."""
    run = inputs.run
    final = run.step == run.num_steps
    if final or (config.every_n_steps and run.step % config.every_n_steps == 0):
        from opdgraph.runtime.evaluation import run_eval

        label = "final" if final else "periodic"
        run.eval_records.append(run_eval(config, inputs, label=label))

"""Eval stage: greedy (or sampled) generations on held-out prompts, scored against the teacher, shown as samples.

Reads `student_weights` (after the optimizer step), writes `eval_metrics`. With several teachers a routed row is
answered and scored by its own teacher, a mixture's rows are scored against the mixture, and each teacher's own
figures are reported too (opdgraph.runtime.evaluation); the plan sizes the eval's pools and workspace for that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import attrs

from opdgraph import sizing
from opdgraph import work as W
from opdgraph.config.fields import non_negative, positive, setting
from opdgraph.config.paths import missing_file_problems
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


def _eval_teachers(facts: StageFacts) -> tuple[list, list[list]]:
    """(the teachers that answer eval rows, the sets of teachers that score a micro-batch together), as
    opdgraph.runtime.eval_answers and evaluation run them: routed, each teacher answers and scores its own rows,
    one after another; a mixture's first teacher answers and all of them score together; one teacher does both."""
    teachers = list(facts.teachers)
    if len(facts.groups) > 1:
        return teachers, [[teacher] for teacher in teachers]
    return teachers[:1], [teachers]


def _keys(teachers: list) -> tuple[str, ...]:
    """The sizing keys of several teachers, each once."""
    return tuple(dict.fromkeys(key for teacher in teachers for key in teacher.keys))


def _scoring_bytes(facts: StageFacts, counts, teachers: list) -> tuple[int, int]:
    """(bytes, upcast hidden) of scoring a micro-batch against `teachers` at once: the student's and their hidden
    states, the largest forward workspace, and the metrics' logit chunk (a mixture's too: its running mixture is
    made before the metrics' own peak, tests/test_saved_bytes_loss.py; on CPU every lm_head upcast to fp32)."""
    tokens, teacher_tokens, student = counts.micro_batch_tokens, counts.teacher_micro_batch_tokens, facts.student_shape
    hidden = sizing.hidden_state_bytes(student, tokens, facts.student_dtype_bytes) + sum(
        sizing.hidden_state_bytes(teacher.shape, teacher_tokens, teacher.dtype_bytes) for teacher in teachers)
    reference = [facts.reference_tokens("student", counts.sequence_tokens), *(
        counts.teacher_sequence_tokens if teacher.attention_fallback else 0 for teacher in teachers)]
    models = zip([student, *(t.shape for t in teachers)],
                 [facts.student_dtype_bytes, *(t.dtype_bytes for t in teachers)], reference)
    fla = counts.prompts if facts.fla_linear_core else 0  # sequences sharing a forward (fla's chunk states)
    workspace = max(sizing.forward_workspace_bytes(shape, model_tokens, dtype_bytes, fallback, fla_sequences=fla)
                    for (shape, dtype_bytes, fallback), model_tokens
                    in zip(models, [tokens, *(teacher_tokens for _ in teachers)]))
    upcast = 0 if facts.targets_cuda else student.hidden + sum(teacher.shape.hidden for teacher in teachers)
    metrics = sizing.logit_chunk_bytes(counts.chunk_tokens, student.vocab, sizing.EVAL_METRICS_LOGIT_BUFFERS,
                                       upcast_hidden=upcast)
    return hidden + workspace + metrics, upcast


def plan_buffers(stage_name: str, config: Config, facts: StageFacts) -> list[Buffer]:
    """What an eval allocates (opdgraph.runtime.eval_answers and evaluation), all freed after the eval step: a KV
    pool for the student's answers and one for the teacher's (each engine's, sized by counts.eval_counts; routed
    teachers answer one after another, so the largest one's), and one workspace for the larger of its two phases:
    generating, and scoring the answers in micro-batches (against a mixture: every teacher's hidden states at once)."""
    counts, keys = facts.eval_counts(stage_name), facts.setting_keys
    answering, scoring = _eval_teachers(facts)
    several = len(facts.teachers) > 1
    shapes = {"student": facts.student_shape, "teacher": answering[0].shape}
    dtypes = {"student": facts.student_dtype_bytes, "teacher": answering[0].dtype_bytes}
    pool_keys = (f"{stage_name}.num_prompts", keys["max_num_seqs"], "data.max_prompt_tokens",
                 f"{stage_name}.max_new_tokens", keys["page_size"])
    # Hybrid SFT: the student also answers after each prompt's gold prefix (opdgraph.runtime.gold_prefix_eval).
    gold = " + gold_prefix_max_tokens" if facts.gold_keys else ""
    fla = counts.concurrent_seqs if facts.fla_linear_core else 0  # sequences sharing a forward (fla's chunk states)
    rows = min(counts.concurrent_seqs, facts.prefill_token_budget)  # a prefill may hold every running sequence
    generate = max(max(sizing.forward_workspace_bytes(shape, facts.prefill_token_budget, dtype_bytes,
                                                      fla_sequences=fla, paged=True, sequences=rows),
                       sizing.linear_decode_peak_bytes(shape, counts.concurrent_seqs + 1, dtype_bytes,
                                                       facts.fla_linear_core))
                   + sizing.decode_logits_bytes(counts.concurrent_seqs, shape.vocab)
                   for shape, dtype_bytes in [(facts.student_shape, facts.student_dtype_bytes),
                                              *((t.shape, t.dtype_bytes) for t in answering)])
    score, upcast = max(_scoring_bytes(facts, counts, teachers) for teachers in scoring)
    mixed = len(scoring[0]) > 1
    metrics_formula = f"chunk x V_student x {sizing.EVAL_METRICS_LOGIT_BUFFERS} x 4 (metrics" + (
        ", also against the mixture)" if mixed else ")") + (
        (" + V_student x (h_s + sum h_t) x 4 (fp32 lm_heads on CPU)" if mixed else
         " + V_student x (h_s + h_t) x 4 (fp32 lm_heads on CPU)") if upcast else "")
    teacher_keys = _keys(facts.teachers) if several else answering[0].keys
    # Where rollout takes the GPU path, eval decodes in bursts, whose idle rows use one scratch state slot.
    slots = counts.concurrent_seqs + (1 if facts.uses_flashinfer else 0)
    all_keys = (*pool_keys, keys["prefill_token_budget"], keys["micro_batch_tokens"], keys["chunk_tokens"],
                "pipeline.device", *facts.student_keys, *teacher_keys)
    teacher_pool = max(sizing.kv_cache_bytes(t.shape, counts.teacher_num_pages, counts.page_size, t.dtype_bytes)
                       + sizing.recurrent_state_bytes(t.shape, slots, t.dtype_bytes)
                       for t in answering)
    answering_keys = _keys(answering) if several else answering[0].keys
    buffers = [
        buffer(f"{stage_name}.kv_cache", "kv_cache",
               sizing.kv_cache_bytes(shapes["student"], counts.num_pages, counts.page_size, dtypes["student"])
               + sizing.recurrent_state_bytes(shapes["student"], slots, dtypes["student"]),
               (*pool_keys, *facts.gold_keys, *facts.student_keys),
               formula="eval pages x page_size x L x 2 x kv x d; eval pages = min(num_prompts, max_num_seqs) x "
                       f"ceil((max_prompt_tokens{gold} + max_new_tokens) / page_size)"),
        buffer(f"{stage_name}.teacher_kv_cache", "kv_cache", teacher_pool, (*pool_keys, *answering_keys),
               formula="eval pages x page_size x L_teacher x 2 x kv_teacher x d_teacher (the teacher's answers" + (
                   ": the largest of the routed teachers', which answer one after another)" if len(answering) > 1
                   else ")") + ("; its pages count the teacher's own, longer prompts" if counts.teacher_num_pages
                                > counts.num_pages else "")),
        buffer(f"{stage_name}.workspace", "workspace", max(generate, score),
               facts.with_linear_core_keys(all_keys, facts.student_shape, *(t.shape for t in facts.teachers)),
               formula=("max(prefill forward workspace + eval seqs x V x 4 of either model, "
                        "eval micro-batch tokens x (h_s d_s + h_t d_t) + larger forward workspace + "
                        if not several else
                        "max(prefill forward workspace + eval seqs x V x 4 of the student or an answering teacher, "
                        "eval micro-batch tokens x (h_s d_s + " + ("sum h_t d_t" if mixed else "the largest h_t d_t")
                        + ") + the largest forward workspace + ") + f"{metrics_formula})"),
    ]
    if facts.world_size > 1:  # the sharded student generates on gathered weights (scoring gathers one layer at a time)
        buffers.append(buffer(f"{stage_name}.gathered_weights", "weights",
                              sizing.parameter_bytes(shapes["student"], dtypes["student"]), facts.student_keys,
                              formula="P x d (all-gathered for eval generation)"))
    return buffers


def resolve_defaults(stage_name: str, config: Config, data, settings: dict) -> Config:
    """At load (opdgraph.config.loader): files default to data.eval_files, max_new_tokens to the rollout's (its
    step setting, by name)."""
    if config.max_new_tokens is None and "max_new_tokens" in settings:
        config = attrs.evolve(config, max_new_tokens=settings["max_new_tokens"][1])
    if config.files is None:
        config = attrs.evolve(config, files=list(data.eval_files))
    return config


def check_pipeline(stage_name: str, config: Config, view, problem) -> list:
    """Config-time checks against the other tables (opdgraph.config.checks): eval's answers fit, and it has prompt
    files that exist."""
    return _check_lengths(stage_name, config, view, problem) + _check_files(stage_name, config, view, problem)


def _check_lengths(stage_name: str, config: Config, view, problem) -> list:
    """An eval response must fit where eval puts it: whole in one scoring micro-batch (teacher_score's), and within
    the positions of the student and the teacher (both answer the eval prompts). Eval prompts are at most
    data.max_prompt_tokens (the loader rejects longer ones) and eval's KV pools are sized from these same numbers
    (opdgraph.counts.eval_counts), so these are the limits. What rollout's own checks already cover (eval answering
    no longer than rollout) is not reported twice. Rollout's and teacher_score's settings are read by name."""
    if "max_new_tokens" not in view.step_settings or config.max_new_tokens is None:
        return []
    problems = []
    prompt_tokens, new_tokens = view.data.max_prompt_tokens, config.max_new_tokens
    needed = prompt_tokens + new_tokens
    longer_than_rollout = new_tokens > view.step_settings["max_new_tokens"][1]
    scorer = view.step_settings.get("micro_batch_tokens")  # (the first teacher stage, its micro-batch)
    if scorer is not None and longer_than_rollout and scorer[1] < needed:
        scorer_name, limit = scorer
        problems.append(problem(f"{stage_name}.max_new_tokens", _too_long(
            stage_name, new_tokens, prompt_tokens,
            f"a scoring micro-batch ({scorer_name}.micro_batch_tokens = {limit})", limit - prompt_tokens,
            f"raise {scorer_name}.micro_batch_tokens to at least {needed}")))
    for model, model_config in view.models.items():
        role = model_config.role
        limit = view.max_positions(model)
        if limit and needed > limit and (role == "teacher" or longer_than_rollout):
            problems.append(problem(f"{stage_name}.max_new_tokens", _too_long(
                stage_name, new_tokens, prompt_tokens, f"the {role}'s positions ([models.{model}] "
                f"max_position_embeddings = {limit})", limit - prompt_tokens, "lower data.max_prompt_tokens")))
    return problems


def _too_long(name: str, new_tokens: int, prompt_tokens: int, container: str, most: int, alternative: str) -> str:
    fix = f"set {name}.max_new_tokens to at most {most}, or {alternative}" if most > 0 else alternative
    return (f"{name}.max_new_tokens = {new_tokens} after prompts of up to data.max_prompt_tokens = {prompt_tokens} "
            f"makes eval sequences of {prompt_tokens + new_tokens} tokens, more than {container} holds (nothing is "
            f"truncated); {fix}")


def _check_files(stage_name: str, config: Config, view, problem) -> list:
    """Eval has prompts to answer, and every prompt file of its own (not data.eval_files, which the generic data
    check covers) exists before anything runs (the runtime reads them only after loading the models)."""
    eval_files = view.data.eval_files
    if not config.files:
        return [problem(f"{stage_name}.files" if config.files != eval_files else "data.eval_files",
                        f"[{stage_name}] has no prompt files to evaluate on: set data.eval_files (or "
                        f"{stage_name}.files), or remove the [{stage_name}] table")]
    if config.files == eval_files:
        return []
    listed = [(f"{stage_name}.files[{index}]", file) for index, file in enumerate(config.files)]
    return missing_file_problems(listed, view.base_dir, problem)


def run_settings(config: Config) -> dict[str, object]:
    """The prompt files the run loads for eval (opdgraph.runtime.startup; default: data.eval_files), and how long
    its answers are (sft's config checks: the gold prefix must leave room for the longest)."""
    return {"eval_files": config.files, "eval_max_new_tokens": config.max_new_tokens}


def bind(stage_name: str, config: Config, run) -> dict:
    """What an eval uses (opdgraph.runtime.evaluation): the student, the teacher stages, the tokenizer, the eval
    prompts, the run's eval engines (built at the first eval), the offloader that brings teachers in, the plan's
    eval facts."""
    return {"student": run.student, "teachers": run.teachers, "tokenizer": run.tokenizer,
            "prompts": run.eval_prompts, "engines": run.eval_engines, "offloader": run.teacher_offloader,
            "plan_facts": run.plan.facts}


def release_hooks(stage_name: str, config: Config, models: dict) -> dict:
    """The plan's releases of the eval pools drop the eval engines' pools."""
    from opdgraph.runtime.eval_answers import release_hooks as pool_hooks

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

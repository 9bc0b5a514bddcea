"""SFT stage (hybrid SFT + OPD): token cross-entropy on a gold prefix, composed with the divergence on the student's
own continuation in one backward.

Each prompt row carries a gold solution (`gold_prefix_field`). At every step the first k of its tokens (k from the
schedule, opdgraph.train.prefix_schedule) are placed at the start of the assistant turn, tokenised as one sequence
with the prompt (opdgraph.data.gold_prefix), and the student samples only the continuation. In the packed sequence
prompt + prefix + continuation the positions whose next token is a prefix token g_j are trained here:

    L_sft = weight x sum_j w_j CE_j,   CE_j = -log softmax(h_j W_s^T)[g_j]   (temperature 1, full vocabulary)

with w_j = 1 / (gold-prefix tokens of the step's global batch) for normalize = "token", or 1 / (sequences with a
prefix x that sequence's prefix length) for "sequence" (so weight = 1 is the mean CE per prefix token, whatever k).
The loss stage's divergence covers only the continuation (the prefix is on the prompt side of its mask), and the
teacher scores only that: it runs over prompt and prefix as the context its continuation positions need, its hidden
states are kept at the continuation positions only, and the plan counts just those (opdgraph.stage_plan). The step
minimises loss + L_sft; both gradients meet in the one backward (stages/backward.py scatters this stage's
`hidden_grad` to the prefix positions, the loss's to the continuation).

Reads `responses` and the loss's `hidden_grad` (for order: it trains on the student forward the loss stage runs,
`student_activations`, inside the fused micro-batch loop), writes `sft_hidden_grad`. Per micro-batch it takes the
student's hidden states at the prefix positions (`<stage>.student_hidden`) and walks them in chunks of
`chunk_tokens` (logits of one chunk at a time, `<stage>.logit_chunk`), like the loss.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import attrs

from opdgraph import sizing
from opdgraph import work as W
from opdgraph.config.fields import non_negative, positive, setting
from opdgraph.drafts import Draft, buffer
from opdgraph.plan import Buffer
from opdgraph.train.prefix_schedule import PrefixScheduleName

if TYPE_CHECKING:  # the compiler's facts and the runtime's inputs; types only, so importing a stage stays light
    from opdgraph.runtime.stage_inputs import StageInputs
    from opdgraph.stage_plan import StageFacts

READS = ("responses", "hidden_grad")
WRITES = ("sft_hidden_grad",)
BACKWARD_READS = WRITES  # the backward also scatters this gradient (stages/__init__.py backward_values_of)
MICRO_BATCH = True  # runs once per training micro-batch, between the loss and the backward
KIND = "sft"
# fp32 [chunk, V] buffers of train.sft_loss.chunked_cross_entropy: the logits (log-softmax, probabilities and the
# gradient in place) and logsumexp's exp temporary
LOGIT_BUFFERS = 2


def _fraction(value) -> str | None:
    return None if 0 < value <= 1 else f"must be in (0, 1] (1.0 = the whole gold, up to the token limit), got {value!r}"


@attrs.frozen(kw_only=True)
class Config:
    gold_prefix_field: str = setting(help="the prompt-row field holding the gold solution (a non-empty string); a "
                                          "row without it is an error naming its file and line")
    gold_prefix_max_tokens: int = setting(help="most gold tokens placed before the rollout (the schedule scales "
                                               "it); bounds the plan's sequences", check=positive)
    gold_prefix_fraction: float = setting(1.0, help="also at most this share of each row's gold tokens (the "
                                                    "schedule scales it too)", check=_fraction)
    schedule: PrefixScheduleName = setting(
        "constant", help="the prefix over training: constant, or linear decay to no prefix over decay_steps steps")
    decay_steps: int = setting(0, help="schedule = linear: steps until the prefix is gone (plain OPD after)",
                               check=non_negative)
    weight: float = setting(1.0, help="weight of the cross-entropy term beside the divergence (>= 0)",
                            check=non_negative)
    normalize: Literal["token", "sequence"] = setting(
        "token", help="average over the step's gold-prefix tokens, or per sequence first (see the formula above)")
    chunk_tokens: int = setting(1024, help="prefix positions whose logits are materialised at once", check=positive)

    def cross_problems(self):
        if self.schedule == "linear" and self.decay_steps == 0:
            yield "decay_steps", "schedule = \"linear\" needs decay_steps > 0 (the steps until the prefix is gone)"
        if self.schedule == "constant" and self.decay_steps:
            yield "decay_steps", "decay_steps applies to schedule = \"linear\" only; remove it or set the schedule"

    def prefix_schedule(self):
        from opdgraph.train.prefix_schedule import PrefixSchedule

        return PrefixSchedule(max_tokens=self.gold_prefix_max_tokens, fraction=self.gold_prefix_fraction,
                              schedule=self.schedule, decay_steps=self.decay_steps)


def step_settings(config: Config) -> dict[str, int]:
    """The gold prefix's bound: part of every sequence's prompt side (opdgraph.counts)."""
    return {"gold_prefix_max_tokens": config.gold_prefix_max_tokens}


def backward_buffers(stage_name: str, facts: StageFacts) -> tuple[str, ...]:
    """The sft stage's hidden-state gradient buffer (loop-local), which the backward reads beside the loss's."""
    return (facts.local(f"{stage_name}.hidden_grad"),)


def _positions(facts: StageFacts) -> int:
    """Prefix positions of one micro-batch: every sequence at the full prefix."""
    return facts.counts.sequences_per_micro_batch * facts.counts.gold_prefix_tokens


def _chunk_tokens(config: Config, facts: StageFacts) -> int:
    return min(config.chunk_tokens, _positions(facts))


def plan_steps(stage_name: str, config: Config, facts: StageFacts) -> list[Draft]:
    """Per micro-batch of the fused loop, the cross-entropy chunk by chunk: the student's lm_head only (logits,
    the hidden-state gradient and the lm_head gradient); no teacher work."""
    student, local, chunk = facts.student_shape, facts.local, _chunk_tokens(config, facts)
    chunks = facts.group_micro_batches * math.ceil(_positions(facts) / chunk)
    moved = student.vocab * student.hidden * facts.student_dtype_bytes + 2 * chunk * student.vocab * sizing.FP32_BYTES
    return [Draft(local(stage_name), stage_name, KIND,
                  (f"{facts.student}.weights", local("student_activations"), "responses"),
                  (local(f"{stage_name}.student_hidden"), local(f"{stage_name}.logit_chunk"),
                   local(f"{stage_name}.hidden_grad"), f"{facts.student}.grads"),
                  (*facts.loop(stage_name), f"{stage_name}.chunk"), chunks,
                  W.roofline(3 * W.lm_head_flops(student, chunk), moved, 0, facts.hardware, chunks))]


def plan_facts(stage_name: str, config: Config, facts: StageFacts) -> dict[str, int]:
    chunk = _chunk_tokens(config, facts)
    return {f"{stage_name}.chunk_tokens": chunk,
            f"{stage_name}.chunks_per_micro_batch": math.ceil(_positions(facts) / chunk)}


def plan_buffers(stage_name: str, config: Config, facts: StageFacts) -> list[Buffer]:
    """The student's hidden states at the prefix positions, their gradient (read by the backward) and one chunk's
    logits."""
    shape, dtype_bytes, local = facts.student_shape, facts.student_dtype_bytes, facts.local
    keys = (*facts.micro_keys, *facts.student_keys)
    positions = _positions(facts)
    upcast = 0 if facts.targets_cuda else shape.hidden
    prefix = "micro-batch sequences x gold_prefix_max_tokens x h x d"
    return [
        buffer(local(f"{stage_name}.student_hidden"), "activations",
               sizing.hidden_state_bytes(shape, positions, dtype_bytes), keys, formula=prefix),
        buffer(local(f"{stage_name}.hidden_grad"), "activations",
               sizing.hidden_state_bytes(shape, positions, dtype_bytes), keys, formula=prefix),
        buffer(local(f"{stage_name}.logit_chunk"), "logit_chunk",
               sizing.logit_chunk_bytes(_chunk_tokens(config, facts), shape.vocab, LOGIT_BUFFERS,
                                        upcast_hidden=upcast),
               (f"{stage_name}.chunk_tokens", "pipeline.device", *keys),
               formula=f"chunk x V_student x {LOGIT_BUFFERS} x 4 (fp32 logits and logsumexp's temporary)"
               + (" + V_student x h_student x 4 (fp32 lm_head on CPU)" if upcast else "")),
    ]


def check_pipeline(stage_name: str, config: Config, view, problem) -> list:
    """Config-time checks of a hybrid pipeline across its tables (opdgraph.config.checks): one sft stage, the fused
    loop it runs in, and room for prompt + gold prefix + continuation in the training micro-batch and in every
    model's positions. The gold prefix sits on the prompt side of every sequence (up to data.max_prompt_tokens +
    gold_prefix_max_tokens tokens before the continuation), so the limits the other kinds check for
    data.max_prompt_tokens + max_new_tokens are checked here again with the prefix; a limit the plain check already
    reports is not reported twice. The other kinds' settings are read by name (rollout's max_new_tokens, every
    teacher stage's table, every eval's max_new_tokens); a second sft stage is itself the problem."""
    first = view.every_setting["sft"][0][0]  # every sft stage publishes its table, in table order
    if stage_name != first:
        return [problem(stage_name, f"[{stage_name}] is a second sft stage beside [{first}]; a pipeline places one "
                                    f"gold prefix: keep one sft table")]
    problems = []
    if not view.pipeline.fuse_training:
        problems.append(problem("pipeline.fuse_training", (
            f"[{stage_name}] trains in the fused micro-batch loop, on the student forward the loss runs; set "
            f"pipeline.fuse_training = true (the default) or remove [{stage_name}]")))
    if "max_new_tokens" not in view.step_settings:  # no rollout: reported by the graph check
        return problems
    rollout, new_tokens = view.step_settings["max_new_tokens"]
    prompt_tokens, gold = view.data.max_prompt_tokens, config.gold_prefix_max_tokens
    plain = prompt_tokens + new_tokens
    needed = plain + gold
    where = f"{stage_name}.gold_prefix_max_tokens"
    scorers = view.every_setting.get("teacher_score_config", ())
    for scorer, scoring in scorers:
        tokens = scoring.micro_batch_tokens
        if plain <= tokens < needed:
            problems.append(problem(f"{scorer}.micro_batch_tokens", (
                f"a micro-batch of {tokens} tokens cannot hold one whole sequence of data.max_prompt_tokens + "
                f"{where} + {rollout}.max_new_tokens = {needed} tokens; raise micro_batch_tokens to at "
                f"least {needed} (or lower {where} to at most {tokens - plain})")))
    evals = [tokens for _, tokens in view.every_setting.get("eval_max_new_tokens", ()) if tokens]
    longest = max([new_tokens, *evals])
    for model in view.models:
        limit = view.max_positions(model)
        if limit and prompt_tokens + longest <= limit < prompt_tokens + gold + longest:
            problems.append(problem(where, (
                f"data.max_prompt_tokens + {where} + the longest response ({longest} new tokens) = "
                f"{prompt_tokens + gold + longest} exceeds [models.{model}] max_position_embeddings "
                f"({limit}); lower {where} to at most {limit - prompt_tokens - longest}")))
    for scorer, scoring in scorers:
        prompt_limit, model = scoring.max_prompt_tokens, scoring.model
        limit = view.max_positions(model)
        if prompt_limit and limit and prompt_limit + new_tokens <= limit < prompt_limit + gold + new_tokens:
            # The teacher scores its own prompt, then the gold prefix, then the continuation.
            problems.append(problem(where, (
                f"{scorer}.max_prompt_tokens + {where} + {rollout}.max_new_tokens = "
                f"{prompt_limit + gold + new_tokens} exceeds [models.{model}] max_position_embeddings ({limit}); "
                f"lower {where} to at most {limit - prompt_limit - new_tokens} or the teacher's max_prompt_tokens")))
    return problems


def run_settings(config: Config) -> dict[str, object]:
    """The run's hybrid facts (opdgraph.runtime.hybrid): the rollout places its prefix schedule, the prompt loader
    reads its gold field."""
    return {"sft": config}


def bind(stage_name: str, config: Config, run) -> dict:
    """The student (its lm_head) and the gradients the lm_head's analytic gradient joins."""
    return {"student": run.student, "gradients": run.gradients}


def execute(step, config: Config, inputs: StageInputs) -> None:
    from opdgraph.runtime.sft_step import sft_cross_entropy

    sft_cross_entropy(config, inputs)

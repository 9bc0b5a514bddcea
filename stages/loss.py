"""Loss stage: full-vocabulary divergence between student and teacher next-token distributions, in chunks.

Reads `responses` and `teacher_hidden`, writes `hidden_grad` (the gradient w.r.t. the student's final hidden
states). Logits exist only for `chunk_tokens` positions at a time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import attrs

from opdgraph import sizing
from opdgraph import work as W
from opdgraph.config.fields import positive, setting, unit_interval
from opdgraph.drafts import STUDENT_FORWARD, TEACHER_HEAD, Draft, buffer
from opdgraph.plan import Buffer

if TYPE_CHECKING:  # the compiler's facts and the runtime's inputs; types only, so importing a stage stays light
    from opdgraph.runtime.stage_inputs import StageInputs
    from opdgraph.stage_plan import StageFacts

READS = ("responses", "teacher_hidden")
MICRO_BATCH = True  # runs once per training micro-batch (fused with the other such stages into one loop)
WRITES = ("hidden_grad",)


@attrs.frozen(kw_only=True)
class Config:
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "sampled_token"] = setting(
        help="forward_kl: KL(teacher||student); reverse_kl: KL(student||teacher); jsd: generalised JSD(beta); "
             "sampled_token: reverse KL estimated on the sampled token only")
    beta: float = setting(0.5, help="jsd only: mixture weight, strictly between 0 and 1", check=unit_interval)
    temperature: float = setting(1.0, help="softmax temperature applied to both logits", check=positive)
    chunk_tokens: int = setting(1024, help="positions whose logits are materialised at once", check=positive)
    normalize: Literal["token", "sequence"] = setting("token", help="average over all tokens, or per sequence first")
    kernel: Literal["auto", "torch", "triton"] = setting("auto", help="divergence implementation")
    allow_biased_estimate: bool = setting(
        False, help="sampled_token only: accept rollouts that are not plain samples at the loss temperature (top_k, "
                    "top_p, min_p, greedy, another temperature), knowing the estimate is then biased")
    route_field: str = setting("", help="with several teacher stages: the prompt-row field whose value picks the "
                                        "teacher that scores the row (see teacher_score.route); '' = no routing")

    def cross_problems(self):
        if self.divergence == "jsd" and not 0 < self.beta < 1:
            if self.beta in (0, 1):
                limit = "forward_kl" if self.beta == 0 else "reverse_kl"
                yield "beta", (f"jsd needs 0 < beta < 1, got {self.beta!r}; at beta = {self.beta:g} JSD degenerates "
                               f"to zero -- use divergence = \"{limit}\" for that limit")
            else:
                yield "beta", f"jsd needs 0 < beta < 1, got {self.beta!r}"


def values(stage_name: str, config: Config, stages: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Reads what every teacher stage writes (opdgraph.stages.teacher_values_of)."""
    from opdgraph.stages import teacher_values_of  # the registry imports this module: imported when called

    return ("responses", *(teacher_values_of(stages) or ["teacher_hidden"])), WRITES


def step_settings(config: Config) -> dict[str, object]:
    """The chunk size, and the row field that routes each row to its teacher (opdgraph.teachers; '' = not routed)."""
    return {"chunk_tokens": config.chunk_tokens, "route_field": config.route_field}


def plan_steps(stage_name: str, config: Config, facts: StageFacts) -> list[Draft]:
    """The student forward once per micro-batch, then the divergence chunk by chunk inside it (against the loop's
    teachers: a routed loop's one, or every teacher of a mixture)."""
    student, counts, teachers = facts.student_shape, facts.counts, facts.group_teachers
    s_dtype, local = facts.student_dtype_bytes, facts.local
    micro = facts.group_micro_batches if facts.fused else counts.num_micro_batches
    chunks, chunk_tokens = micro * counts.chunks_per_micro_batch, counts.chunk_tokens
    weights = f"{facts.student}.weights"
    comm = (f"{facts.student}.fsdp_comm",) if facts.world_size > 1 else ()
    forward_bytes = facts.student_weight_bytes + counts.micro_batch_tokens * student.hidden * s_dtype
    forward = W.roofline(W.forward_flops(student, counts.micro_batch_tokens, counts.sequence_tokens), forward_bytes,
                         0, facts.hardware, micro)
    flops = 3 * W.lm_head_flops(student, chunk_tokens) + sum(W.lm_head_flops(t.shape, chunk_tokens) for t in teachers)
    moved = (student.vocab * student.hidden * s_dtype
             + sum(t.shape.vocab * t.shape.hidden * t.dtype_bytes for t in teachers)
             + 2 * chunk_tokens * (2 * student.vocab + sum(t.shape.vocab for t in teachers)) * 4)
    if mixes_teachers(facts):  # each teacher's own divergence, for the log: its logits again, beside a student copy
        flops += sum(W.lm_head_flops(t.shape, chunk_tokens) for t in teachers)
        moved += sum(t.shape.vocab * t.shape.hidden * t.dtype_bytes
                     + 2 * chunk_tokens * (student.vocab + t.shape.vocab) * 4 for t in teachers)
    teacher_weights = tuple(dict.fromkeys(t.weights_buffer for t in teachers if t.weights_buffer != weights))
    return [Draft(local(f"{stage_name}.student_forward"), stage_name, "loss", (weights, "responses"),
                  (local("student_hidden"), local("student_activations"), *comm), facts.loop(stage_name), micro,
                  forward, frozenset({STUDENT_FORWARD})),
            Draft(local(stage_name), stage_name, "loss",
                  (weights, *teacher_weights, local("student_hidden"), *(t.spec.hidden for t in teachers),
                   "responses"),
                  (local("logit_chunk"), local("hidden_grad"), f"{facts.student}.grads"),
                  (*facts.loop(stage_name), f"{stage_name}.chunk"), chunks,
                  W.roofline(flops, moved, 0, facts.hardware, chunks), frozenset({TEACHER_HEAD}))]


def plan_buffers(stage_name: str, config: Config, facts: StageFacts) -> list[Buffer]:
    """The student's final hidden states, its saved activations (for backward), the hidden-state gradient and
    the chunk's logits; the activations and the gradient cross to backward (a micro-batch's fused, else the
    batch's). A routed fused plan has these once per teacher loop (group-local names)."""
    shape, dtype_bytes, counts, local = facts.student_shape, facts.student_dtype_bytes, facts.counts, facts.local
    tokens, keys = facts.crossing_tokens
    scored, _ = facts.scored_crossing_tokens  # hybrid SFT: not the gold prefix's positions (stages/sft.py)
    gold = " (gold prefix positions excluded)" if counts.gold_prefix_tokens else ""
    checkpointing = facts.activation_checkpointing
    reference = facts.reference_tokens("student", counts.sequence_tokens)
    per_layer = facts.activation_label
    logit_bytes, logit_formula = _logit_chunk(config, facts)
    return [
        buffer(local("student_hidden"), "activations",
               sizing.hidden_state_bytes(shape, counts.scored_micro_batch_tokens, dtype_bytes),
               (*facts.micro_keys, *facts.student_keys), formula="micro-batch tokens x h x d" + gold),
        buffer(local("student_activations"), "activations",
               sizing.activation_bytes(shape, tokens, dtype_bytes, checkpointing,
                                       reference_sequence_tokens=reference),
               (*keys, facts.setting_keys["activation_checkpointing"], "pipeline.device",
                *facts.student_keys),
               formula=f"tokens x (L x h x d + {per_layer} + o)" if checkpointing
               else f"tokens x (L x {per_layer} + o)"),
        buffer(local("hidden_grad"), "activations", sizing.hidden_state_bytes(shape, scored, dtype_bytes),
               (*keys, *facts.student_keys), formula="tokens x h x d" + gold),
        buffer(local("logit_chunk"), "logit_chunk", logit_bytes,
               (f"{stage_name}.chunk_tokens", f"{stage_name}.kernel", f"{stage_name}.divergence", "pipeline.device",
                *facts.student_keys, *(key for t in facts.group_teachers for key in t.keys)), formula=logit_formula),
    ]


def mixes_teachers(facts: StageFacts) -> bool:
    """A mixture: the loss reads several teachers on every row (the torch path: the kernel takes one teacher)."""
    return len(facts.group_teachers) > 1 and len(facts.groups) <= 1


def _logit_chunk(config: Config, facts: StageFacts) -> tuple[int, str]:
    """(bytes, formula) of the per-chunk peak for the path that runs (sizing.py: Logit chunk). On a CUDA target
    kernel "auto" is planned as the fused Triton kernel: the GPU install has triton (the gpu extra)."""
    vocab, chunk_tokens = facts.student_shape.vocab, facts.counts.chunk_tokens
    if mixes_teachers(facts):
        mixed = len(facts.group_teachers)
        buffers = sizing.TORCH_LOSS_LOGIT_BUFFERS[config.divergence] + sizing.MIXTURE_EXTRA_LOGIT_BUFFERS
        upcast = 0 if facts.targets_cuda else facts.student_shape.hidden + sum(
            t.shape.hidden for t in facts.group_teachers)
        formula = (f"chunk x V_student x {buffers} x 4 (torch {config.divergence} against a mixture of {mixed} "
                   f"teachers: fp32 logits, the running mixture and one teacher's log-probs)")
        return (sizing.logit_chunk_bytes(chunk_tokens, vocab, buffers, upcast_hidden=upcast),
                formula + (" + V_student x (h_student + sum h_teacher) x 4 (fp32 lm_heads on CPU)" if upcast else ""))
    if facts.targets_cuda and config.kernel != "torch":
        return (sizing.logit_chunk_bytes(chunk_tokens, vocab, sizing.FUSED_LOSS_LOGIT_BUFFERS, fused=True),
                "chunk x (2 V_student + 2) x 4 (fused kernel: student and teacher fp32 logits)")
    buffers = sizing.TORCH_LOSS_LOGIT_BUFFERS[config.divergence]
    upcast = facts.cpu_upcast_hidden
    formula = f"chunk x V_student x {buffers} x 4 (torch {config.divergence}: fp32 logits and temporaries)"
    return (sizing.logit_chunk_bytes(chunk_tokens, vocab, buffers, upcast_hidden=upcast),
            formula + (" + V_student x (h_student + h_teacher) x 4 (fp32 lm_heads on CPU)" if upcast else ""))


def check_pipeline(stage_name: str, config: Config, view, problem) -> list:
    """Config-time checks against the other tables (opdgraph.config.checks):
    - sampled_token estimates reverse KL from the sampled token alone: log p_s(y) - log p_t(y) averages to
      KL(p_s || p_t) only when y is drawn from p_s itself, the student's softmax at the loss temperature. A filtered
      (top_k, top_p, min_p), greedy or differently tempered rollout draws y from another distribution, and the
      estimate is biased by an amount nothing reports.
    - The Triton divergence kernel runs on CUDA only; on device = "cpu" it could only fail at the first loss, after
      the models are loaded. device = "auto" is decided on the machine that runs (check_device, at startup)."""
    problems = []
    rollout = view.run_settings.get("rollout_config")  # (the rollout stage, its Config): rollout's run setting
    if rollout is not None and config.divergence == "sampled_token" and not config.allow_biased_estimate:
        rollout_name, sampling = rollout
        reasons = [reason for reason, applies in (
            ("greedy = true", sampling.greedy), (f"top_k = {sampling.top_k}", sampling.top_k > 0),
            (f"top_p = {sampling.top_p}", sampling.top_p < 1), (f"min_p = {sampling.min_p}", sampling.min_p > 0),
            (f"temperature = {sampling.temperature} (the loss uses {config.temperature})",
             sampling.temperature != config.temperature)) if applies]
        if reasons:
            problems.append(problem(f"{stage_name}.divergence",
                                    f"divergence = \"sampled_token\" is an unbiased estimate of reverse KL only for "
                                    f"tokens sampled from the student at the loss temperature, but [{rollout_name}] "
                                    f"has {', '.join(reasons)}; sample plainly there (or use reverse_kl, exact over "
                                    f"the vocabulary), or set {stage_name}.allow_biased_estimate = true to accept "
                                    f"the bias"))
    if view.pipeline.device == "cpu" and config.kernel == "triton":
        problems.append(problem(f"{stage_name}.kernel",
                                f"{stage_name}.kernel = \"triton\" runs on CUDA only, but pipeline.device = \"cpu\"; "
                                f"set {stage_name}.kernel = \"auto\" or \"torch\" (or pipeline.device = \"cuda\")"))
    return problems


def check_device(stage_name: str, config: Config, device) -> None:
    """At startup, before any weights load: a kernel the device cannot run is a DeviceError naming the key."""
    from opdgraph.runtime.training import check_loss_kernel

    check_loss_kernel(config.kernel, device, where=f"{stage_name}.kernel")


def run_settings(config: Config) -> dict[str, object]:
    """How the rollout weights each micro-batch's positions (opdgraph.runtime.batches, through the run's facts)."""
    return {"normalize": config.normalize}


def bind(stage_name: str, config: Config, run) -> dict:
    """The student, every teacher stage (a routed micro-batch takes its own, a mixture all) and the gradients the
    lm_head's analytic gradient joins."""
    return {"student": run.student, "teachers": run.teachers, "gradients": run.gradients}


def execute(step, config: Config, inputs: StageInputs) -> None:
    from opdgraph.runtime import training

    if step.name.endswith(".student_forward"):  # keeps the graph (student_activations) for the backward
        training.student_forward(inputs, keep_graph=inputs.loop.local("student_activations") in step.writes,
                                 write_hidden=True)
    else:
        training.chunked_loss(config, inputs)

"""The fit search: when a plan is over `memory_budget_gib`, find the cheapest plan of a small decision space that fits.

A candidate is one explicit Decisions record:
- teacher_weights: keep | offload | stream | shard  (opdgraph.placement; shard only with several ranks)
- optimizer_state: keep | offload                (fp32 masters + AdamW moments in host memory, streamed by the step)
- activation_checkpointing: off | on             (backward.activation_checkpointing)
- student_gather: step | layer                   (several ranks: the student gathered once per step or per layer)
- micro_batch_tokens, chunk_tokens, max_num_seqs (teacher_score / loss / rollout settings, each from a short ladder)
Every candidate is compiled into a full plan (the decisions applied as config overrides plus the placement), so its
peak and its predicted seconds per step come from the same lifetime analysis and roofline model as any plan:
compute at the card's matmul rate and copy bandwidth, PCIe copies of offloads, reloads and streams at pcie_gbps,
the extra forward of checkpointing, the all-gathers of a sharded teacher at interconnect_gbps (overlapped with its
compute, as FSDP prefetches), and more prefill/decode waves for fewer concurrent sequences. The choice is the
fitting candidate with the least predicted step time; ties go to fewer offloads (a sharded teacher counts as one),
then the configured-first order of each decision (a deterministic total order, so the same config always gives the
same plan). A sharded teacher is never predicted faster than a replicated one (same compute, plus its gathers), so
the search shards it only when replicating it does not fit. The two student_gather schedules predict the same time
where FSDP hides its exchanges behind compute (the roofline cannot see what that overlap costs), so "step", first in
the order, is kept wherever it fits (measured faster: benchmarks/results/multi_gpu_*).

The search runs only when `[pipeline.fit] enabled` and the configured plan is over budget, or when the table forces
something (a decision, a ladder or a forbidden value); otherwise the configured plan is returned untouched.
"""

from __future__ import annotations

import itertools

import attrs

from opdgraph.teachers import teacher_weights

from opdgraph.compile import compile_plan
from opdgraph.counts import step_settings
from opdgraph.config.schema import FIT_CHOICES, PipelineConfig
from opdgraph.errors import OpdgraphError
from opdgraph.placement import Placement, configured_placement
from opdgraph.plan import Plan
from opdgraph.stages import published_settings

GIB = 1024**3
MIN_CHUNK_TOKENS = 256
MIN_NUM_SEQS = 8
LADDER_STEPS = 4  # values per default ladder: the configured one and up to three halvings


# The decisions that are stage settings, found by name among the stages' step settings (the kinds that own them
# publish them: backward, teacher_score, loss, rollout), so this module never looks a stage up by its kind.
STAGE_DECISIONS = ("activation_checkpointing", "micro_batch_tokens", "chunk_tokens", "max_num_seqs")


@attrs.frozen(kw_only=True)
class Decisions:
    teacher_weights: str
    optimizer_state: str
    activation_checkpointing: bool
    micro_batch_tokens: int
    chunk_tokens: int
    max_num_seqs: int
    student_gather: str = "step"

    @property
    def placement(self) -> Placement:
        return Placement(teacher_weights=self.teacher_weights, optimizer_state=self.optimizer_state,
                         student_gather=self.student_gather)

    @property
    def offloads(self) -> int:
        return (self.teacher_weights != "keep") + (self.optimizer_state != "keep")

    def describe(self) -> str:
        return (f"teacher weights {self.teacher_weights}, optimizer state {self.optimizer_state}, activation "
                f"checkpointing {'on' if self.activation_checkpointing else 'off'}, micro-batch "
                f"{self.micro_batch_tokens} tokens, loss chunk {self.chunk_tokens} tokens, "
                f"{self.max_num_seqs} sequences at a time"
                + (", student gathered per layer" if self.student_gather == "layer" else ""))


@attrs.frozen
class Candidate:
    decisions: Decisions
    plan: Plan


@attrs.frozen(kw_only=True)
class FitResult:
    cfg: PipelineConfig  # the config with the chosen decisions applied (what the runtime runs)
    plan: Plan  # the chosen plan (or the configured one when no search ran); plan.fit describes the search
    decisions: Decisions
    searched: bool
    fits: bool
    candidates: tuple[Candidate, ...] = ()


def configured_decisions(cfg: PipelineConfig) -> Decisions:
    placement, settings = configured_placement(cfg), step_settings(cfg)
    return Decisions(teacher_weights=placement.teacher_weights, optimizer_state=placement.optimizer_state,
                     **{name: settings[name] for name in STAGE_DECISIONS}, student_gather=placement.student_gather)


def apply_decisions(cfg: PipelineConfig, decisions: Decisions) -> PipelineConfig:
    """The config with the decisions' settings written into their stage tables; provenance says 'fit'."""
    stages, provenance = dict(cfg.stages), dict(cfg.provenance)
    for stage in cfg.stages.values():  # every stage that publishes a setting gets it (each teacher stage its
        # micro_batch_tokens: they share the micro-batch)
        chosen = {key: getattr(decisions, key) for key in STAGE_DECISIONS if key in published_settings(stage)}
        for key, value in chosen.items():
            if getattr(stage.config, key) != value:
                stages[stage.name] = attrs.evolve(stage, config=attrs.evolve(stages[stage.name].config,
                                                                             **{key: value}))
                provenance[f"{stage.name}.{key}"] = "fit"
    models = dict(cfg.models)
    offloaded = decisions.teacher_weights in ("offload", "stream")
    for teacher in (name for name, model in cfg.models.items() if model.role == "teacher"):
        if models[teacher].offload_when_idle != offloaded:
            models[teacher] = attrs.evolve(models[teacher], offload_when_idle=offloaded)
            provenance[f"models.{teacher}.offload_when_idle"] = "fit"
    return attrs.evolve(cfg, stages=stages, models=models, provenance=provenance)


def candidate_plan(cfg: PipelineConfig, decisions: Decisions, world_size: int = 1) -> Plan:
    return compile_plan(apply_decisions(cfg, decisions), decisions.placement, world_size=world_size)


def _halvings(start: int, floor: int) -> list[int]:
    values = [start]
    while len(values) < LADDER_STEPS and values[-1] // 2 >= floor:
        values.append(values[-1] // 2)
    return values


def _choices(fit, decision: str, configured: str, unavailable: tuple[str, ...] = ()) -> list[str]:
    forced = getattr(fit, decision)
    if forced != "auto":
        return [forced]
    ordered = [configured, *(choice for choice in FIT_CHOICES[decision] if choice != configured)]
    return [choice for choice in ordered if f"{decision}.{choice}" not in fit.forbid and choice not in unavailable]


def check_world_size(cfg: PipelineConfig, world_size: int) -> None:
    """A teacher sharded across ranks needs more than one rank."""
    fit = cfg.pipeline.fit
    where = cfg.provenance.get("pipeline.fit.teacher_weights", "default")
    if world_size == 1 and fit.teacher_weights == "shard":
        raise OpdgraphError(f"pipeline.fit.teacher_weights = 'shard' ({where}) splits the teacher across ranks, but "
                            "this plan is for one process: plan with --nproc-per-node N / launch with torchrun "
                            "--nproc-per-node N (N > 1), or choose 'keep', 'offload', 'stream' or 'auto'")
    if world_size == 1 and fit.teacher_weights == "auto" and all(
            f"teacher_weights.{choice}" in fit.forbid for choice in ("keep", "offload", "stream")):
        raise OpdgraphError("pipeline.fit.forbid leaves only teacher_weights.shard, which needs several ranks; allow "
                            "one of keep, offload, stream for a one-process plan")


def search_space(cfg: PipelineConfig, world_size: int = 1) -> list[Decisions]:
    """Every candidate, in a fixed order: the configured value of each decision first (see the ladders' help)."""
    check_world_size(cfg, world_size)
    fit, base = cfg.pipeline.fit, configured_decisions(cfg)
    settings = step_settings(cfg)
    sequence_tokens = (cfg.data.max_prompt_tokens + settings.get("gold_prefix_max_tokens", 0)
                       + settings["max_new_tokens"])
    micro = fit.micro_batch_tokens or _halvings(base.micro_batch_tokens, sequence_tokens)
    chunks = fit.chunk_tokens or _halvings(base.chunk_tokens, min(MIN_CHUNK_TOKENS, base.chunk_tokens))
    seqs = fit.max_num_seqs or _halvings(base.max_num_seqs, min(MIN_NUM_SEQS, base.max_num_seqs))
    checkpointing = _choices(fit, "activation_checkpointing", "on" if base.activation_checkpointing else "off")
    # One process has no FSDP schedule to choose: only the configured value (which nothing reads).
    gathers = _choices(fit, "student_gather", base.student_gather) if world_size > 1 else [base.student_gather]
    one_teacher = len(teacher_weights(cfg)) == 1  # FSDP shards one teacher (opdgraph.buffers.place_buffers)
    product = itertools.product(_choices(fit, "teacher_weights", base.teacher_weights,
                                         ("shard",) if world_size == 1 or not one_teacher else ()),
                                _choices(fit, "optimizer_state", base.optimizer_state),
                                checkpointing, micro, chunks, seqs, gathers)
    return [Decisions(teacher_weights=teacher, optimizer_state=optimizer, activation_checkpointing=ckpt == "on",
                      micro_batch_tokens=micro_tokens, chunk_tokens=chunk, max_num_seqs=num_seqs,
                      student_gather=gather)
            for teacher, optimizer, ckpt, micro_tokens, chunk, num_seqs, gather in product]


def choose(candidates: list[Candidate], budget_bytes: int) -> Candidate | None:
    """The one rule: least predicted step time among plans within budget; ties -> fewer offloads -> search order
    (configured values first: the roofline often cannot tell sizes apart, and the user's sizes are the tie-break)."""
    fitting = [(index, candidate) for index, candidate in enumerate(candidates)
               if candidate.plan.peak_bytes <= budget_bytes]
    if not fitting:
        return None
    return min(fitting, key=lambda item: (item[1].plan.step_seconds, item[1].decisions.offloads, item[0]))[1]


def _forced(fit, world_size: int) -> bool:
    """Whether the table asks for a search; the FSDP schedule (student_gather) means nothing to one process."""
    decisions = [d for d in FIT_CHOICES if world_size > 1 or d != "student_gather"]
    forbid = [item for item in fit.forbid if world_size > 1 or not item.startswith("student_gather.")]
    return (any(getattr(fit, decision) != "auto" for decision in decisions)
            or bool(fit.micro_batch_tokens or fit.chunk_tokens or fit.max_num_seqs or forbid))


def fit_plan(cfg: PipelineConfig, world_size: int = 1) -> FitResult:
    """Compile `cfg`; if it is over budget (or the fit table forces something), search and return the cheapest
    plan that fits, or -- when none does -- the candidate with the smallest peak (fits=False)."""
    check_world_size(cfg, world_size)
    plan = compile_plan(cfg, world_size=world_size)
    decisions = configured_decisions(cfg)
    fit = cfg.pipeline.fit
    if not fit.enabled or (not plan.over_budget and not _forced(fit, world_size)):
        return FitResult(cfg=cfg, plan=plan, decisions=decisions, searched=False, fits=not plan.over_budget)
    candidates = [Candidate(d, candidate_plan(cfg, d, world_size)) for d in search_space(cfg, world_size)]
    chosen = choose(candidates, plan.budget_bytes)
    fits = chosen is not None
    if chosen is None:
        chosen = min(candidates, key=lambda c: (c.plan.peak_bytes, c.plan.step_seconds))
    summary = _summary(chosen, candidates, fits)
    return FitResult(cfg=apply_decisions(cfg, chosen.decisions), plan=attrs.evolve(chosen.plan, fit=summary),
                     decisions=chosen.decisions, searched=True, fits=fits, candidates=tuple(candidates))


def _summary(chosen: Candidate, candidates: list[Candidate], fits: bool) -> dict[str, object]:
    """What `opdgraph plan` prints about the search (also stored in plan.fit for the JSON output)."""
    kept = [c for c in candidates if c.decisions.offloads == 0]
    fastest_kept = min(kept, key=lambda c: (c.plan.step_seconds, c.plan.peak_bytes), default=None)
    smallest_kept = min(kept, key=lambda c: (c.plan.peak_bytes, c.plan.step_seconds), default=None)
    summary = {"fits": fits, "candidates": len(candidates),
               "fitting": sum(c.plan.peak_bytes <= c.plan.budget_bytes for c in candidates),
               "decisions": attrs.asdict(chosen.decisions), "described": chosen.decisions.describe(),
               "step_seconds": chosen.plan.step_seconds,
               "peak_bytes": chosen.plan.peak_bytes}
    if fastest_kept is not None:
        summary.update(no_offload_step_seconds=fastest_kept.plan.step_seconds,
                       no_offload_peak_bytes=fastest_kept.plan.peak_bytes,
                       no_offload_min_peak_bytes=smallest_kept.plan.peak_bytes)
    return summary

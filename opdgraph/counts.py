"""Derived counts of one training step: sequences, KV pages, micro-batches, chunks. Config in, plain numbers out.

Token counts are upper bounds (every prompt at max_prompt_tokens, every response at max_new_tokens, in a hybrid SFT
pipeline every gold prefix at gold_prefix_max_tokens, on the prompt side): the plan must hold for the worst step.
Training packs whole sequences into micro-batches of at most micro_batch_tokens tokens (a sequence is never split:
attention needs all of it), and the loss walks each micro-batch in chunks (not over a gold prefix: the sft stage
trains those positions, stages/sft.py).
With several ranks (data parallel) every count is per rank: each rank rolls out and trains on its share of the
step's sequences.

An eval stage has counts of its own (`eval_counts`): it generates with its own KV pools (the student's and the
teacher's), sized for its prompts and its max_new_tokens, and scores in micro-batches of whole eval sequences.
Every rank evaluates all eval prompts, so these are not divided by the number of ranks.

The settings that size a step (max_new_tokens, micro_batch_tokens, chunk_tokens, ...) are the stages' own, found by
name in `step_settings` (each kind's `step_settings(config)`, the first stage in table order that has one), so
this module never asks which kind owns a setting.
"""

from __future__ import annotations

import math

import attrs

from opdgraph.config.schema import PipelineConfig
from opdgraph.errors import OpdgraphError
from opdgraph.sizing import kv_pool_pages
from opdgraph.stages import named_settings


@attrs.frozen(kw_only=True)
class StepCounts:
    sequences: int  # prompts_per_step x samples_per_prompt
    prompt_tokens: int  # data.max_prompt_tokens (+ the gold prefix: the student's rollout prompt)
    new_tokens: int  # rollout.max_new_tokens
    concurrent_seqs: int  # min(rollout.max_num_seqs, sequences)
    page_size: int
    num_pages: int
    sequences_per_micro_batch: int
    num_micro_batches: int
    chunk_tokens: int
    chunks_per_micro_batch: int
    gold_prefix_tokens: int = 0  # hybrid SFT (stages/sft.py): the gold prefix's bound, part of prompt_tokens

    @property
    def sequence_tokens(self) -> int:
        return self.prompt_tokens + self.new_tokens

    @property
    def train_tokens(self) -> int:
        return self.sequences * self.sequence_tokens

    @property
    def scored_micro_batch_tokens(self) -> int:
        """A micro-batch's positions outside the gold prefix (all of them without one): what the divergence covers."""
        return self.sequences_per_micro_batch * (self.sequence_tokens - self.gold_prefix_tokens)

    @property
    def micro_batch_tokens(self) -> int:
        return self.sequences_per_micro_batch * self.sequence_tokens

    @property
    def decode_rounds(self) -> int:
        return math.ceil(self.sequences / self.concurrent_seqs) * self.new_tokens

    def facts(self) -> dict[str, int]:
        return {
            "rollout.sequences": self.sequences, "rollout.concurrent_seqs": self.concurrent_seqs,
            "rollout.num_pages": self.num_pages, "rollout.page_size": self.page_size,
            "rollout.kv_pool_tokens": self.num_pages * self.page_size, "rollout.decode_rounds": self.decode_rounds,
            "train.tokens_per_step": self.train_tokens, "train.sequence_tokens": self.sequence_tokens,
            "train.micro_batch_tokens": self.micro_batch_tokens,
            "train.sequences_per_micro_batch": self.sequences_per_micro_batch,
            "train.num_micro_batches": self.num_micro_batches, "loss.chunk_tokens": self.chunk_tokens,
            "loss.chunks_per_micro_batch": self.chunks_per_micro_batch,
            **({"train.gold_prefix_tokens": self.gold_prefix_tokens,
                "train.micro_batch_scored_tokens": self.scored_micro_batch_tokens,
                "train.micro_batch_gold_tokens": self.sequences_per_micro_batch * self.gold_prefix_tokens}
               if self.gold_prefix_tokens else {}),
        }


@attrs.frozen(kw_only=True)
class EvalCounts:
    stage: str  # the eval stage's table name
    prompts: int  # eval.num_prompts (an upper bound: the eval files may hold fewer)
    prompt_tokens: int  # data.max_prompt_tokens
    new_tokens: int  # eval.max_new_tokens
    concurrent_seqs: int  # min(eval.num_prompts, rollout.max_num_seqs)
    page_size: int  # rollout.page_size
    num_pages: int  # enough for every concurrent eval sequence: eval never preempts
    micro_batch_tokens: int  # whole eval sequences per scoring micro-batch x their length
    chunk_tokens: int  # loss.chunk_tokens, at most one micro-batch
    teacher_num_pages: int  # the teacher's pool: its own prompts may be longer (teacher-side context)
    sequences_per_micro_batch: int
    teacher_prompt_tokens: int  # the longest prompt a teacher scores eval answers after (its context included)

    @property
    def sequence_tokens(self) -> int:
        return self.prompt_tokens + self.new_tokens

    @property
    def teacher_sequence_tokens(self) -> int:
        return self.teacher_prompt_tokens + self.new_tokens

    @property
    def teacher_micro_batch_tokens(self) -> int:
        """A scoring micro-batch's sequences, each with the longest teacher prompt: what a teacher forward holds."""
        return self.sequences_per_micro_batch * self.teacher_sequence_tokens

    def facts(self) -> dict[str, int]:
        name = self.stage
        facts = {f"{name}.concurrent_seqs": self.concurrent_seqs, f"{name}.num_pages": self.num_pages,
                 f"{name}.kv_pool_tokens": self.num_pages * self.page_size,
                 f"{name}.micro_batch_tokens": self.micro_batch_tokens, f"{name}.chunk_tokens": self.chunk_tokens,
                 f"{name}.teacher_forward_tokens": self.teacher_micro_batch_tokens}
        if self.teacher_num_pages != self.num_pages:
            facts[f"{name}.teacher_num_pages"] = self.teacher_num_pages
        return facts


def step_settings(cfg: PipelineConfig) -> dict[str, object]:
    """Every stage's settings that size a training step, by name (see the module docstring)."""
    return {key: value for key, (_, value) in named_settings(cfg.stages, "step_settings").items()}


def setting_key(cfg: PipelineConfig, name: str) -> str:
    """The dotted config key of the step setting `name` (`backward.grad_accumulation_dtype`), for sized-by lists."""
    stage, _ = named_settings(cfg.stages, "step_settings")[name]
    return f"{stage}.{name}"


def eval_counts(cfg: PipelineConfig, stage_name: str) -> EvalCounts:
    """The eval stage's pool and batch sizes; the runtime builds its eval engines and micro-batches from these."""
    config, settings = cfg.stages[stage_name].config, step_settings(cfg)
    sequence_tokens = cfg.data.max_prompt_tokens + config.max_new_tokens
    # Hybrid SFT: the student also answers after the gold prefix (eval's accuracy with it): pages for it.
    student_prompt_tokens = cfg.data.max_prompt_tokens + settings.get("gold_prefix_max_tokens", 0)
    concurrent = min(config.num_prompts, settings["max_num_seqs"])
    per_micro_batch = min(max(1, settings["micro_batch_tokens"] // sequence_tokens), config.num_prompts)
    page_size = settings["page_size"]
    return EvalCounts(
        stage=stage_name, prompts=config.num_prompts, prompt_tokens=cfg.data.max_prompt_tokens,
        new_tokens=config.max_new_tokens, concurrent_seqs=concurrent, page_size=page_size,
        num_pages=kv_pool_pages(concurrent_seqs=concurrent, max_prompt_tokens=student_prompt_tokens,
                                max_new_tokens=config.max_new_tokens, page_size=page_size, kv_pool_tokens=0),
        micro_batch_tokens=per_micro_batch * sequence_tokens,
        chunk_tokens=min(settings["chunk_tokens"], per_micro_batch * sequence_tokens),
        teacher_num_pages=kv_pool_pages(concurrent_seqs=concurrent, max_prompt_tokens=_eval_teacher_prompt(cfg),
                                        max_new_tokens=config.max_new_tokens, page_size=page_size,
                                        kv_pool_tokens=0),
        sequences_per_micro_batch=per_micro_batch, teacher_prompt_tokens=_longest_teacher_prompt(cfg))


def _longest_teacher_prompt(cfg: PipelineConfig) -> int:
    """The longest prompt any teacher scores eval answers after (its own context included)."""
    from opdgraph.teachers import teacher_specs  # imports this module's importers: imported when called

    specs = teacher_specs(cfg.models, cfg.stages, cfg.data.max_prompt_tokens)
    return max([cfg.data.max_prompt_tokens, *(spec.prompt_tokens for spec in specs)])


def _eval_teacher_prompt(cfg: PipelineConfig) -> int:
    """The prompt limit of the teachers that answer eval prompts: the first teacher stage in plan order, or with
    routed rows every teacher (each answers its own rows in a pool of the same pages), the longest limit."""
    from opdgraph.stage_plan import ordered_stages  # stage_plan imports this module: imported when called
    from opdgraph.teachers import route_field, teacher_specs

    specs = {spec.stage: spec for spec in teacher_specs(cfg.models, cfg.stages, cfg.data.max_prompt_tokens)}
    ordered = [specs[name] for name in ordered_stages(cfg) if name in specs]
    if not ordered:
        return cfg.data.max_prompt_tokens
    if route_field(cfg.stages) and len(ordered) > 1:
        return max(spec.prompt_tokens for spec in ordered)
    return ordered[0].prompt_tokens


def step_counts(cfg: PipelineConfig, world_size: int = 1) -> StepCounts:
    settings = step_settings(cfg)
    micro_batch_tokens, new_tokens = settings["micro_batch_tokens"], settings["max_new_tokens"]
    if cfg.data.prompts_per_step % world_size:
        where = cfg.provenance.get("data.prompts_per_step", "default")
        raise OpdgraphError(
            f"data.prompts_per_step = {cfg.data.prompts_per_step} ({where}) is not divisible by {world_size} ranks "
            f"(--nproc-per-node / torchrun's WORLD_SIZE); every rank must get the same number of prompts, so choose "
            f"a multiple of the number of ranks"
        )
    sequences = cfg.data.sequences_per_step // world_size
    gold = settings.get("gold_prefix_max_tokens", 0)
    prompt_tokens = cfg.data.max_prompt_tokens + gold
    sequence_tokens = prompt_tokens + new_tokens
    concurrent = min(settings["max_num_seqs"], sequences)
    per_micro_batch = min(max(1, micro_batch_tokens // sequence_tokens), sequences)
    scored = per_micro_batch * (sequence_tokens - gold)  # the loss's chunks: not the gold prefix (stages/sft.py)
    chunk_tokens = min(settings["chunk_tokens"], scored)
    return StepCounts(
        sequences=sequences, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
        concurrent_seqs=concurrent, page_size=settings["page_size"],
        num_pages=kv_pool_pages(concurrent_seqs=concurrent, max_prompt_tokens=prompt_tokens,
                                max_new_tokens=new_tokens, page_size=settings["page_size"],
                                kv_pool_tokens=settings["kv_pool_tokens"]),
        sequences_per_micro_batch=per_micro_batch,
        num_micro_batches=math.ceil(sequences / per_micro_batch),
        chunk_tokens=chunk_tokens,
        chunks_per_micro_batch=math.ceil(scored / chunk_tokens),
        gold_prefix_tokens=gold,
    )

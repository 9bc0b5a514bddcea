"""Building a run from its config and plan (`build_context`): models and teachers, the rollout engine, FSDP where
there are several ranks, the optimizer, the prompt sampler, the metrics log, the facts the stages read.
"""

from __future__ import annotations

from pathlib import Path

import torch

from opdgraph.counts import step_settings
from opdgraph.runtime import distributed, fsdp
from opdgraph.runtime.batches import training_budgets
from opdgraph.runtime.buffers import BufferTable
from opdgraph.runtime.context import TORCH_DTYPES, RunContext, seed_everything
from opdgraph.runtime.engine_setup import build_engine, use_layer_kernels, use_packed_attention
from opdgraph.runtime.gradients import StudentGradients
from opdgraph.runtime.hybrid import sft_facts
from opdgraph.runtime.metrics import MetricsLog
from opdgraph.runtime.model_loading import load_models
from opdgraph.runtime.startup import Startup, check_startup
from opdgraph.runtime.teachers import build_teachers, distinct_models, route_facts
from opdgraph.stages import named_settings


class SilentMetrics:
    """The metrics log of ranks other than 0: rank 0 writes the (global) records."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"

    def write(self, record) -> None:
        pass

    def write_samples(self, step, samples) -> None:
        pass

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass

def _load_student_weights(student, checkpoint: Path) -> None:
    from opdgraph.models.checkpoint import (
        read_safetensors_dir,
        state_dict_from_checkpoint,
    )

    tensors = read_safetensors_dir(checkpoint / "student")
    student.load_state_dict(state_dict_from_checkpoint(student, tensors, str(checkpoint / "student"),
                                                       student.dtype, student.device))

def build_context(cfg, plan, run_dir: Path, resume_from: Path | None = None,
                  startup: Startup | None = None, reporters=None) -> RunContext:
    from opdgraph.data import PromptSampler
    from opdgraph.runtime.offload import build_optimizer, plan_placement

    startup = startup or check_startup(cfg)
    device, train_prompts, eval_prompts = startup.device, startup.train_prompts, startup.eval_prompts
    seed_everything(cfg.pipeline.seed)
    models = load_models(cfg.models, Path(cfg.base_dir), device, startup.tokenizers)
    student, tokenizer = models[cfg.model_with_role("student")]
    teachers = build_teachers(cfg, models, student)  # a frozen self-teacher copies the initial student: before resume
    # The first teacher with weights of its own (a live self-teacher is the student): what a shard placement splits
    teacher = next((t.model for t in teachers.values() if t.spec.own_weights), next(iter(teachers.values())).model)
    print(use_packed_attention([student, *distinct_models(teachers, student)], device))
    print(use_layer_kernels(cfg, student, teachers, device))
    if resume_from is not None:  # full weights go in before sharding: each rank then keeps its own rows
        _load_student_weights(student, resume_from)
    # The tables the run builds from, published by their stages by name (never looked up by kind)
    settings = {key: value for key, (_, value) in named_settings(cfg.stages, "run_settings").items()}
    step_setting = step_settings(cfg)
    rollout = settings["rollout_config"]
    engine = build_engine(student, rollout, num_pages=int(plan.facts["rollout.num_pages"]), device=device,
                          kv_dtype=TORCH_DTYPES[cfg.models[cfg.model_with_role("student")].dtype])
    if engine.fused_kernels and distributed.world_size() == 1:
        # gate/up back to back, so the fused rollout runs them as one matmul with no copy: before the optimizer
        # (an fp32 master aliases its parameter's storage). A sharded student gathers new tensors for each
        # rollout; those run as two projections.
        student.pack_gate_up()
    student_name = cfg.model_with_role("student")
    placement = plan_placement(plan)
    gather_per_step = distributed.world_size() > 1 and placement.student_gather == "step"
    # fp32 gradient sums for a low-precision student (opdgraph.runtime.gradients); an fp32 one has them anyway
    fp32_grads = step_setting["grad_accumulation_dtype"] == "float32" and student.dtype != torch.float32
    if distributed.world_size() > 1:
        fsdp.shard_student(student, reduce_dtype=torch.float32 if fp32_grads and gather_per_step else None)
        engine = fsdp.UnshardingEngine(engine, student, keep_gathered=gather_per_step)
    if placement.teacher_weights == "shard":
        if distributed.world_size() == 1:
            raise ValueError("the plan shards the teacher across ranks (teacher_weights = 'shard') but this run has "
                             "one process; launch it with torchrun --nproc-per-node N (N > 1) or plan it for one")
        fsdp.shard_teacher(teacher)
    # Offloaded optimizer state is built in host memory (opdgraph.runtime.offload), never whole on the device.
    optimizer = build_optimizer(placement, student, device, **settings["optimizer_settings"])
    sampler = PromptSampler(train_prompts, prompts_per_step=cfg.data.prompts_per_step, seed=cfg.pipeline.seed,
                            shuffle=cfg.data.shuffle, rank=distributed.rank(), world_size=distributed.world_size())
    if sampler.repeat_note() and distributed.is_main():
        print(sampler.repeat_note())
    metrics = MetricsLog(run_dir, reporters=reporters) if distributed.is_main() else SilentMetrics(run_dir)
    facts = {"samples_per_prompt": cfg.data.samples_per_prompt,
             "rollout_config": rollout, "micro_batch_budgets": training_budgets(plan.facts, teachers),
             "chunk_tokens": int(plan.facts["loss.chunk_tokens"]), "normalize": settings["normalize"],
             "activation_checkpointing": step_setting["activation_checkpointing"],
             "grads_buffer": f"{student_name}.grads",
             # pipeline.release_phase_buffers = false: the plan never frees the gradients; the step zeroes them
             "grads_held": plan.buffers[f"{student_name}.grads"].lifetime == "held",
             "gather_per_step": gather_per_step, **route_facts(cfg), **sft_facts(cfg)}
    buffers = BufferTable(debug=cfg.pipeline.debug_memory)
    gradients = StudentGradients(student, buffers, facts["grads_buffer"], fp32=fp32_grads)
    return RunContext(facts=facts, run_dir=run_dir, device=device, seed=cfg.pipeline.seed, num_steps=cfg.pipeline.num_steps,
                      student=student, teacher=teacher, teachers=teachers, tokenizer=tokenizer, engine=engine, optimizer=optimizer,
                      sampler=sampler, eval_prompts=eval_prompts, plan=plan, buffers=buffers, metrics=metrics,
                      gradients=gradients)

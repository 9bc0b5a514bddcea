"""`opdgraph run`: build the run context, then execute the compiled plan for `pipeline.num_steps` steps.

Run directory (pipeline.output_dir, default runs/<name>): `config.toml` (the resolved config with provenance),
`plan.txt` and `plan.json` (the plan this run executes), `metrics.jsonl`, `samples.jsonl`, `checkpoints/`,
`tensorboard/` (when installed). A run directory that already holds results is never overwritten: pass `--resume`
to continue it or choose another output_dir.

Under torchrun every rank runs this same loop on its share of the prompts (see distributed.py); rank 0 alone
writes the run directory, prints and shows progress, and checkpoints hold gathered (world-size-free) state.
"""

from __future__ import annotations

import functools

import time
from pathlib import Path
from typing import Any

import torch

from opdgraph.runtime import checkpoint as ckpt
from opdgraph.runtime import distributed, fsdp
from opdgraph.runtime.buffers import BufferTable
from opdgraph.runtime.context import (RunContext, TORCH_DTYPES, build_engine, check_same_tokenizer, load_models,
                                      pick_device, seed_everything, use_packed_attention)
from opdgraph.runtime.executor import PlanExecutor
from opdgraph.runtime.gradients import StudentGradients
from opdgraph.runtime.metrics import MetricsLog, ProgressLine
from opdgraph.runtime.skipped_steps import stop_if_stuck
from opdgraph.runtime.run_logs import truncate_run_logs


def run_directory(cfg) -> Path:
    return Path(cfg.pipeline.output_dir or f"runs/{cfg.pipeline.name}")


def _refuse_to_overwrite(run_dir: Path) -> None:
    if (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists():
        raise FileExistsError(
            f"{run_dir} already holds a run (metrics.jsonl or checkpoints/); pass --resume {run_dir} to continue "
            "it, or set pipeline.output_dir (e.g. --set pipeline.output_dir=runs/other) for a new run"
        )


def _write_plan_files(cfg, plan, run_dir: Path) -> None:
    from opdgraph.config import render_resolved
    from opdgraph.render import render_json, render_text

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(render_resolved(cfg))
    (run_dir / "plan.txt").write_text(render_text(plan))
    (run_dir / "plan.json").write_text(render_json(plan))


def _load_prompts(cfg, files: list[str], tokenizer):
    from opdgraph.data import load_prompt_set

    data = cfg.data
    return load_prompt_set([str(Path(cfg.base_dir) / f) for f in files], tokenizer=tokenizer,
                           prompt_field=data.prompt_field, answer_field=data.answer_field,
                           system_prompt=data.system_prompt, max_prompt_tokens=data.max_prompt_tokens,
                           on_bad_row=data.on_bad_row)


class SilentMetrics:
    """The metrics log of ranks other than 0: rank 0 writes the (global) records."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"

    def write(self, record) -> None:
        pass

    def write_samples(self, step, samples) -> None:
        pass

    def close(self) -> None:
        pass


def _load_student_weights(student, checkpoint: Path) -> None:
    from opdgraph.models.checkpoint import read_safetensors_dir, state_dict_from_checkpoint

    tensors = read_safetensors_dir(checkpoint / "student")
    student.load_state_dict(state_dict_from_checkpoint(student, tensors, str(checkpoint / "student"),
                                                       student.dtype, student.device))


def build_context(cfg, plan, run_dir: Path, resume_from: Path | None = None) -> RunContext:
    from opdgraph.data import PromptSampler
    from opdgraph.runtime.offload import build_optimizer, plan_placement

    device = pick_device(cfg.pipeline.device)
    seed_everything(cfg.pipeline.seed)
    models = load_models(cfg.models, Path(cfg.base_dir), device)
    student, tokenizer = models[cfg.model_with_role("student")]
    teacher, teacher_tokenizer = models[cfg.model_with_role("teacher")]
    check_same_tokenizer(tokenizer, teacher_tokenizer)
    teacher.requires_grad_(False)
    print(use_packed_attention([student, teacher], device))
    if resume_from is not None:  # full weights go in before sharding: each rank then keeps its own rows
        _load_student_weights(student, resume_from)
    train_prompts = _load_prompts(cfg, cfg.data.train_files, tokenizer)
    print(f"train prompts: {train_prompts.summary.describe()}")
    eval_stage = cfg.stage("eval")
    eval_files = (eval_stage.config.files or cfg.data.eval_files) if eval_stage else []
    eval_prompts = _load_prompts(cfg, eval_files, tokenizer) if eval_files else None
    rollout = cfg.stage("rollout").config
    step = cfg.stage("step").config
    engine = build_engine(student, rollout, num_pages=int(plan.facts["rollout.num_pages"]), device=device,
                          kv_dtype=TORCH_DTYPES[cfg.models[cfg.model_with_role("student")].dtype])
    student_name = cfg.model_with_role("student")
    placement = plan_placement(plan)
    gather_per_step = distributed.world_size() > 1 and placement.student_gather == "step"
    # fp32 gradient sums for a low-precision student (opdgraph.runtime.gradients); an fp32 one has them anyway
    fp32_grads = cfg.stage("backward").config.grad_accumulation_dtype == "float32" and student.dtype != torch.float32
    if distributed.world_size() > 1:
        fsdp.shard_student(student, reduce_dtype=torch.float32 if fp32_grads and gather_per_step else None)
        engine = fsdp.UnshardingEngine(engine, student, keep_gathered=gather_per_step)
    if placement.teacher_weights == "shard":
        if distributed.world_size() == 1:
            raise ValueError("the plan shards the teacher across ranks (teacher_weights = 'shard') but this run has "
                             "one process; launch it with torchrun --nproc-per-node N (N > 1) or plan it for one")
        fsdp.shard_teacher(teacher)
    # Offloaded optimizer state is built in host memory (opdgraph.runtime.offload), never whole on the device.
    optimizer = build_optimizer(placement, student, device, lr=step.lr, betas=tuple(step.betas),
                                eps=step.eps, weight_decay=step.weight_decay)
    sampler = PromptSampler(train_prompts, prompts_per_step=cfg.data.prompts_per_step, seed=cfg.pipeline.seed,
                            shuffle=cfg.data.shuffle, rank=distributed.rank(), world_size=distributed.world_size())
    log = cfg.stage("log")
    metrics = (MetricsLog(run_dir, tensorboard=bool(log and log.config.tensorboard)) if distributed.is_main()
               else SilentMetrics(run_dir))
    facts = {"samples_per_prompt": cfg.data.samples_per_prompt, "rollout_stage": cfg.stage("rollout").name,
             "rollout_config": rollout, "micro_batch_tokens": int(plan.facts["train.micro_batch_tokens"]),
             "chunk_tokens": int(plan.facts["loss.chunk_tokens"]), "normalize": cfg.stage("loss").config.normalize,
             "activation_checkpointing": cfg.stage("backward").config.activation_checkpointing,
             "grads_buffer": f"{student_name}.grads",
             # pipeline.release_phase_buffers = false: the plan never frees the gradients; the step zeroes them
             "grads_held": plan.buffers[f"{student_name}.grads"].lifetime == "held",
             "gather_per_step": gather_per_step}
    buffers = BufferTable(debug=cfg.pipeline.debug_memory)
    gradients = StudentGradients(student, buffers, facts["grads_buffer"], fp32=fp32_grads)
    return RunContext(facts=facts, run_dir=run_dir, device=device, seed=cfg.pipeline.seed, num_steps=cfg.pipeline.num_steps,
                      student=student, teacher=teacher, tokenizer=tokenizer, engine=engine, optimizer=optimizer,
                      sampler=sampler, eval_prompts=eval_prompts, plan=plan, buffers=buffers, metrics=metrics,
                      gradients=gradients)


def trainer_state(ctx: RunContext) -> dict[str, Any]:
    return {"step": ctx.step, "optimizer": ctx.optimizer.state_dict(), "sampler": ctx.sampler.state_dict(),
            "rng": ckpt.rng_state()}


def save_run_checkpoint(ctx: RunContext, *, keep_last: int) -> Path:
    """Every rank takes part (the weights and optimizer state are gathered); rank 0 writes."""
    from opdgraph.models import save_pretrained

    state = trainer_state(ctx)
    student = fsdp.GatheredModel(ctx.student) if distributed.world_size() > 1 else ctx.student
    path = ckpt.checkpoint_dir(ctx.run_dir, ctx.step)
    if distributed.is_main():
        path = ckpt.save_checkpoint(ctx.run_dir, ctx.step,
                                    save_student=lambda d: save_pretrained(student, d, tokenizer=ctx.tokenizer),
                                    trainer_state=state, summary={"num_steps": ctx.num_steps,
                                                                  "world_size": distributed.world_size()},
                                    keep_last=keep_last)
    distributed.barrier()  # nobody moves on (or reads the directory) before the checkpoint is whole
    return path


def restore(ctx: RunContext, checkpoint: Path) -> None:
    """Continue from a checkpoint: optimizer (fp32 masters and moments), data cursor, RNG states; the weights were
    loaded by build_context before sharding. The checkpoint may come from any number of ranks."""
    state = ckpt.load_trainer_state(checkpoint)
    ctx.optimizer.load_state_dict(state["optimizer"])
    ctx.sampler.load_state_dict(state["sampler"])
    ckpt.set_rng_state(state["rng"])
    ctx.step = int(state["step"])


def run_pipeline(cfg, plan, *, resume: Path | None = None, record_memory: bool = False) -> RunContext:
    """Train; under torchrun (RANK/WORLD_SIZE set) every rank calls this, and a failing rank names itself."""
    distributed.init_distributed(cfg.pipeline.device)
    with distributed.report_rank_failure():
        return _run_pipeline(cfg, plan, resume=resume, record_memory=record_memory)


def _run_pipeline(cfg, plan, *, resume: Path | None, record_memory: bool) -> RunContext:
    run_dir = run_directory(cfg)
    if resume is None:
        _refuse_to_overwrite(run_dir)
    distributed.barrier()  # every rank has checked the directory before rank 0 writes into it
    if distributed.is_main():
        _write_plan_files(cfg, plan, run_dir)
    checkpoint = ckpt.latest_checkpoint(Path(resume)) if resume is not None else None
    if checkpoint is not None and distributed.is_main():
        # Lines logged after the checkpoint would repeat; cut before the logs are opened for appending again.
        truncate_run_logs(run_dir, ckpt.checkpoint_step(checkpoint))
    ctx = build_context(cfg, plan, run_dir, resume_from=checkpoint)
    if checkpoint is not None:
        restore(ctx, checkpoint)
        print(f"resumed at step {ctx.step} from {resume}")
    stage_configs = {name: stage.config for name, stage in cfg.stages.items()}
    hooks = {f"{s.name}.kv_cache": ctx.engine.release for s in cfg.stages_of_kind("rollout")}
    hooks[ctx.facts["grads_buffer"]] = ctx.optimizer.zero_grad
    if ctx.facts["gather_per_step"]:  # the training loop ran on the weights gathered for rollout
        hooks[f"{cfg.model_with_role('student')}.gathered_weights"] = functools.partial(fsdp.end_step_gather,
                                                                                        ctx.student)
    if fsdp.is_sharded(ctx.teacher):  # its root stays gathered from teacher_score until the loss is done
        hooks[f"{cfg.model_with_role('teacher')}.gathered_root"] = functools.partial(fsdp.reshard_forward_only,
                                                                                     ctx.teacher)
    from opdgraph.runtime.evaluation import print_before_after, release_hooks, run_eval

    for entry in cfg.stages_of_kind("eval"):
        hooks.update(release_hooks(ctx, entry.name))
    recorder = None
    if record_memory:
        from opdgraph.runtime.memory_record import MemoryRecorder

        recorder = MemoryRecorder(plan, ctx.device, run_dir)
    executor = PlanExecutor(plan, stage_configs, ctx, release_hooks=hooks, memory_recorder=recorder)
    ctx.teacher_offloader = executor.offloader  # eval needs the teacher on the device where the plan offloads it
    log = cfg.stage("log")
    for entry in cfg.stages_of_kind("eval"):
        if ctx.step == 0 and ctx.eval_prompts is not None:
            ctx.eval_records.append(run_eval(entry.config, ctx, stage=entry.name, label="before"))
            executor.apply_releases(plan.step(entry.name))  # the eval step's releases, as in a training step
    progress = ProgressLine(cfg.pipeline.num_steps, first_step=ctx.step,
                            enabled=bool(log is None or log.config.progress) and distributed.is_main())
    while ctx.step < cfg.pipeline.num_steps:
        started = time.perf_counter()
        ctx.stage_seconds, ctx.step_record = {}, {}
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        executor.run_training_step()
        _sum_over_ranks(ctx.step_record, ("loss", "divergence"), ctx.device)
        record = {"kind": "train", "step": ctx.step, **ctx.step_record,
                  "seconds": time.perf_counter() - started,
                  **{f"seconds/{name}": round(value, 6) for name, value in ctx.stage_seconds.items()}}
        if ctx.device.type == "cuda":
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
        ctx.metrics.write(record)
        stop_if_stuck(ctx, last_step=ctx.step == cfg.pipeline.num_steps)  # too many skipped steps: TrainingStopped
        if log is None or ctx.step % log.config.every_n_steps == 0 or ctx.step == cfg.pipeline.num_steps:
            progress.update(ctx.step, {k: record[k] for k in ("loss", "grad_norm", "lr")
                                       if record.get(k) is not None})
    progress.close()
    ctx.metrics.close()
    if len(ctx.eval_records) >= 2 and ctx.eval_records[0]["label"] == "before":  # a resumed run has no "before"
        print_before_after(ctx.eval_records[0], ctx.eval_records[-1])
    if recorder is not None:
        print("\npredicted vs measured device memory per plan step:\n" + recorder.write())
    return ctx


def _sum_over_ranks(record: dict, keys: tuple[str, ...], device: torch.device) -> None:
    """Each rank's loss is its part of the global mean (weights divide by global counts): the sum is the loss."""
    present = [key for key in keys if key in record]
    for key, value in zip(present, distributed.all_reduce_sum([record[key] for key in present], device)):
        record[key] = value

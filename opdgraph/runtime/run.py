"""`opdgraph run`: build the run context, then execute the compiled plan for `pipeline.num_steps` steps.

Run directory (pipeline.output_dir, default runs/<name>): `config.toml` (the resolved config with provenance, and
what each resume changed), `plan.txt` and `plan.json` (the plan this run executes), `metrics.jsonl`,
`samples.jsonl`, `checkpoints/`, `tensorboard/` (when installed), `run.lock` while a run holds it. Which directory a
run may use, its lock, and what a resume checks and writes are one policy: opdgraph.runtime.run_directory. A run
directory that already holds results is never overwritten: `--resume` continues it, `--restart` starts over one that
has no checkpoint yet.

The end of a training step, in this order: its metrics record is written, the step's logs are fsynced, then (when the
checkpoint stage asked for it, or a signal stops the run) its checkpoint is saved. So a kill at any instant leaves
every record of the steps the newest checkpoint covers, and a resume cuts the logs back to that checkpoint: the
resumed run's logs equal an uninterrupted run's. SIGINT / SIGTERM stop at the end of the current step
(opdgraph.runtime.signals); `ctx.stopped_by` then holds the signal (the CLI exits 128 + signal).

Under torchrun every rank runs this same loop on its share of the prompts (see distributed.py); rank 0 alone locks,
checks and writes the run directory, prints and shows progress, and checkpoints hold gathered (world-size-free)
state.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from opdgraph.runtime import checkpoint as ckpt
from opdgraph.runtime import distributed, fsdp
from opdgraph.runtime.buffers import BufferTable
from opdgraph.runtime.chat_templates import check_template_agreement, configure_chat_templates
from opdgraph.runtime.config_record import config_record
from opdgraph.runtime.context import (RunContext, TORCH_DTYPES, build_engine, load_models, load_tokenizers,
                                      pick_device, seed_everything, use_packed_attention)
from opdgraph.runtime.executor import PlanExecutor
from opdgraph.runtime.gradients import StudentGradients
from opdgraph.runtime.metrics import MetricsLog, ProgressLine
from opdgraph.runtime.run_directory import RunRequest, open_run_directory, resolve
from opdgraph.runtime.skipped_steps import stop_if_stuck
from opdgraph.runtime.signals import Interrupted, StopRequests, chosen_signal, signal_name


def _load_prompts(cfg, files: list[str], tokenizer):
    from opdgraph.config.paths import data_file_path
    from opdgraph.data import load_prompt_set

    data = cfg.data
    return load_prompt_set([data_file_path(cfg.base_dir, f) for f in files], tokenizer=tokenizer,
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

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


def _load_student_weights(student, checkpoint: Path) -> None:
    from opdgraph.models.checkpoint import read_safetensors_dir, state_dict_from_checkpoint

    tensors = read_safetensors_dir(checkpoint / "student")
    student.load_state_dict(state_dict_from_checkpoint(student, tensors, str(checkpoint / "student"),
                                                       student.dtype, student.device))


@dataclass(frozen=True)
class Startup:
    """What the checks that need no weights produce: the device, the tokenizers and the prompt sets."""

    device: torch.device
    tokenizers: dict[str, Any]
    train_prompts: Any
    eval_prompts: Any


def check_startup(cfg) -> Startup:
    """Every check that needs no weights, before any weights are read (so its errors come in seconds, not after
    minutes of loading): the device (and the loss kernel it can run), the student's and the teacher's tokenizers,
    every row of every prompt file.
    `opdgraph run --check` stops here."""
    from opdgraph.runtime.training import check_loss_kernel

    device = pick_device(cfg.pipeline.device)
    for stage in cfg.stages_of_kind("loss"):
        check_loss_kernel(stage.config.kernel, device, where=f"{stage.name}.kernel")
    tokenizers = load_tokenizers(cfg.models, Path(cfg.base_dir),
                                 {name: shape.vocab for name, shape in cfg.shapes.items()})
    tokenizers = configure_chat_templates(cfg, tokenizers)  # each model's template file and variables
    tokenizer = tokenizers[cfg.model_with_role("student")]
    train_prompts = _load_prompts(cfg, cfg.data.train_files, tokenizer)
    check_template_agreement(cfg, tokenizers, train_prompts)
    print(f"train prompts: {train_prompts.summary.describe()}")
    eval_stage = cfg.stage("eval")
    eval_files = (eval_stage.config.files or cfg.data.eval_files) if eval_stage else []
    eval_prompts = _load_prompts(cfg, eval_files, tokenizer) if eval_files else None
    return Startup(device=device, tokenizers=tokenizers, train_prompts=train_prompts, eval_prompts=eval_prompts)


def check_run(cfg, *, resume: Path | None = None, restart: bool = False, allow_config_change: bool = False,
              take_over_lock: bool = False) -> Startup:
    """`opdgraph run --check`: every check a run makes before it trains (the run directory and its lock, the
    checkpoint and config changes of a resume, the device, the tokenizers, every prompt row), then stop. Nothing is
    written: the lock is released and a directory this check created is removed again."""
    import os

    request = RunRequest(resume=Path(resume) if resume is not None else None, restart=restart,
                         allow_config_change=allow_config_change, take_over_lock=take_over_lock)
    holds_directory = os.environ.get("RANK", "0") == "0"  # under torchrun rank 0 alone holds it, as in a run
    directory = open_run_directory(cfg, request, config_record=config_record(cfg)) if holds_directory else None
    try:
        return check_startup(cfg)
    finally:
        if directory is not None:
            directory.close()


def build_context(cfg, plan, run_dir: Path, resume_from: Path | None = None,
                  startup: Startup | None = None) -> RunContext:
    from opdgraph.data import PromptSampler
    from opdgraph.runtime.offload import build_optimizer, plan_placement

    startup = startup or check_startup(cfg)
    device, train_prompts, eval_prompts = startup.device, startup.train_prompts, startup.eval_prompts
    seed_everything(cfg.pipeline.seed)
    models = load_models(cfg.models, Path(cfg.base_dir), device, startup.tokenizers)
    student, tokenizer = models[cfg.model_with_role("student")]
    teacher, _ = models[cfg.model_with_role("teacher")]
    teacher.requires_grad_(False)
    print(use_packed_attention([student, teacher], device))
    if resume_from is not None:  # full weights go in before sharding: each rank then keeps its own rows
        _load_student_weights(student, resume_from)
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
    if sampler.repeat_note() and distributed.is_main():
        print(sampler.repeat_note())
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
            "skipped_steps": ctx.skipped_steps.state_dict(),
            "rng": ckpt.rng_state()}


def save_run_checkpoint(ctx: RunContext, *, keep_last: int, run_config: dict | None) -> Path:
    """Every rank takes part (the weights and optimizer state are gathered); rank 0 writes, after making the logs of
    every step so far durable (a checkpoint never covers a step whose records could still be lost)."""
    from opdgraph.models import save_pretrained

    state = trainer_state(ctx)
    student = fsdp.GatheredModel(ctx.student) if distributed.world_size() > 1 else ctx.student
    path = ckpt.checkpoint_dir(ctx.run_dir, ctx.step)
    if distributed.is_main():
        ctx.metrics.sync()
        path = ckpt.save_checkpoint(ctx.run_dir, ctx.step,
                                    save_student=lambda d: save_pretrained(student, d, tokenizer=ctx.tokenizer),
                                    trainer_state=state, summary={"num_steps": ctx.num_steps,
                                                                  "world_size": distributed.world_size()},
                                    config_record=run_config, keep_last=keep_last)
    distributed.barrier()  # nobody moves on (or reads the directory) before the checkpoint is whole
    return path


def restore(ctx: RunContext, checkpoint: Path) -> None:
    """Continue from a checkpoint: optimizer (fp32 masters and moments), data cursor, RNG states; the weights were
    loaded by build_context before sharding. The checkpoint may come from any number of ranks."""
    state = ckpt.load_trainer_state(checkpoint)
    ctx.optimizer.load_state_dict(state["optimizer"])
    ctx.sampler.load_state_dict(state["sampler"])
    ctx.skipped_steps.load_state_dict(state["skipped_steps"])
    ckpt.set_rng_state(state["rng"])
    ctx.step = int(state["step"])


def run_pipeline(cfg, plan, *, resume: Path | None = None, restart: bool = False, allow_config_change: bool = False,
                 take_over_lock: bool = False, record_memory: bool = False,
                 rerun_args: list[str] | None = None) -> RunContext:
    """Train; under torchrun (RANK/WORLD_SIZE set) every rank calls this, and a failing rank names itself.
    `rerun_args` (the CLI's `run P.toml --set ...`) are shown in the command that resumes a stopped run."""
    distributed.init_distributed(cfg.pipeline.device)
    request = RunRequest(resume=Path(resume) if resume is not None else None, restart=restart,
                         allow_config_change=allow_config_change, take_over_lock=take_over_lock)
    with distributed.report_rank_failure(), StopRequests() as stops:
        return _run_pipeline(cfg, plan, request, stops, record_memory=record_memory,
                             rerun_args=rerun_args or ["run", cfg.source_file])


def _command(rerun_args: list[str], *flags: str) -> str:
    """The command line that runs this pipeline again with `flags` (torchrun's when this run is one)."""
    program = ["opdgraph"]
    if distributed.world_size() > 1:
        program = ["torchrun", f"--nproc-per-node={distributed.world_size()}", "-m", "opdgraph"]
    return shlex.join([*program, *rerun_args, *flags])


def _run_pipeline(cfg, plan, request: RunRequest, stops: StopRequests, *, record_memory: bool,
                  rerun_args: list[str]) -> RunContext:
    run_config = config_record(cfg) if distributed.is_main() else None  # what each checkpoint records of the config
    directory, run_dir = None, resolve(cfg, request)[0]
    try:
        if distributed.is_main():  # locks and checks; raises (leaving the directory as it was) when refused
            directory = open_run_directory(cfg, request, config_record=run_config)
        # Rank 0 chose the checkpoint (falling back past damaged ones); the others learn its step here.
        resumed_step = distributed.all_reduce_max(directory.step if directory and directory.checkpoint else -1,
                                                  pick_device(cfg.pipeline.device))
        checkpoint = ckpt.checkpoint_dir(run_dir, resumed_step) if resumed_step >= 0 else None
        ctx = _train(cfg, plan, run_dir, directory, checkpoint, stops, run_config, record_memory=record_memory)
        if ctx.stopped_by is not None and distributed.is_main():
            _report_stop(ctx, signal_name(ctx.stopped_by), rerun_args)
        return ctx
    except Interrupted as stopped:
        if distributed.is_main():
            _report_stop(None, signal_name(stopped.signum), rerun_args, run_dir=run_dir)
        raise
    finally:
        if directory is not None:
            directory.close()


def _report_stop(ctx: RunContext | None, name: str, rerun_args: list[str], *, run_dir: Path | None = None) -> None:
    """Say where a stopped run stands and the command that continues it (ctx None: stopped at once)."""
    run_dir = ctx.run_dir if ctx is not None else run_dir
    steps = ckpt.complete_steps(run_dir)
    saved = ctx is not None and bool(steps) and steps[-1] == ctx.step
    how = f"stopped by {name} after step {ctx.step}" if ctx is not None else f"stopped at once by {name}"
    if saved:
        where = f"checkpoint {ckpt.checkpoint_dir(run_dir, ctx.step)} written"
    elif steps:
        where = f"the newest checkpoint is step {steps[-1]}"
    else:
        print(f"\nopdgraph: {how}; no checkpoint yet. Start it over with:\n  {_command(rerun_args, '--restart')}",
              file=sys.stderr)
        return
    print(f"\nopdgraph: {how}; {where}. Resume with:\n  {_command(rerun_args, '--resume', str(run_dir))}",
          file=sys.stderr)


def _train(cfg, plan, run_dir: Path, directory, checkpoint: Path | None, stops: StopRequests,
           run_config: dict | None, *, record_memory: bool) -> RunContext:
    ctx = build_context(cfg, plan, run_dir, resume_from=checkpoint)
    if directory is not None:
        directory.begin(cfg, plan)  # the first writes into the run directory: every check has passed
    distributed.barrier()
    if checkpoint is not None:
        restore(ctx, checkpoint)
        print(f"resumed at step {ctx.step} from {checkpoint}")
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
    saving = cfg.stage("checkpoint").config if cfg.stage("checkpoint") else None
    stops.graceful = True  # from here a signal stops at the end of the step
    while ctx.step < cfg.pipeline.num_steps:
        started = time.perf_counter()
        ctx.stage_seconds, ctx.step_record, ctx.checkpoint_due = {}, {}, False
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        executor.run_training_step()
        own_signal, flags = stops.signum, stops.flags()  # what this rank sends; a later signal counts next step
        stop_votes = _sum_over_ranks(ctx.step_record, ("loss", "divergence"), ctx.device, extra=flags)
        record = {"kind": "train", "step": ctx.step, **ctx.step_record,
                  "seconds": time.perf_counter() - started,
                  **{f"seconds/{name}": round(value, 6) for name, value in ctx.stage_seconds.items()}}
        if ctx.device.type == "cuda":
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
        ctx.metrics.write(record)
        if log is None or ctx.step % log.config.every_n_steps == 0 or ctx.step == cfg.pipeline.num_steps:
            progress.update(ctx.step, {k: record[k] for k in ("loss", "grad_norm", "lr")
                                       if record.get(k) is not None})
        stop = chosen_signal(own_signal, stop_votes) if ctx.step < cfg.pipeline.num_steps else None
        if saving is not None and (ctx.checkpoint_due or (stop is not None and saving.on_signal)):
            save_run_checkpoint(ctx, keep_last=saving.keep_last, run_config=run_config)
        stop_if_stuck(ctx, last_step=ctx.step == cfg.pipeline.num_steps)  # too many skipped steps: TrainingStopped
        if stop is not None:
            ctx.stopped_by = stop
            break
    stops.graceful = False
    progress.close()
    ctx.metrics.close()
    finished = ctx.stopped_by is None and len(ctx.eval_records) >= 2
    if finished and ctx.eval_records[0]["label"] == "before":  # a resumed run has no "before"
        print_before_after(ctx.eval_records[0], ctx.eval_records[-1])
    if distributed.is_main() and ctx.eval_records:
        from opdgraph.render.eval_curves import write_eval_curves

        print(f"eval curves: {write_eval_curves(run_dir, cfg.pipeline.name)}")
    if recorder is not None:
        print("\npredicted vs measured device memory per plan step:\n" + recorder.write())
    return ctx


def _sum_over_ranks(record: dict, keys: tuple[str, ...], device: torch.device, *, extra: list[float]) -> list[float]:
    """Each rank's loss is its part of the global mean (weights divide by global counts): the sum is the loss. The
    `extra` numbers (the stop requests) ride in the same all-reduce; their sums are returned."""
    present = [key for key in keys if key in record]
    summed = distributed.all_reduce_sum([record[key] for key in present] + list(extra), device)
    for key, value in zip(present, summed):
        record[key] = value
    return summed[len(present):]

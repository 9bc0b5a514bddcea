"""`opdgraph run`: build the run context, then execute the compiled plan for `pipeline.num_steps` steps.

Run directory (pipeline.output_dir, default runs/<name>): `config.toml` (the resolved config with provenance, and
what each resume changed), `plan.txt` and `plan.json` (the plan this run executes), `metrics.jsonl`,
`samples.jsonl`, `checkpoints/`, `run.lock` while a run holds it; `reporters.json` and the trackers' files
(`tensorboard/`, `wandb/`) when `[log] report_to` names trackers (opdgraph.runtime.reporters). Which directory a
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
import shlex
import sys
import time
from pathlib import Path

import torch

from opdgraph.runtime import checkpoint as ckpt
from opdgraph.runtime import distributed, fsdp
from opdgraph.runtime.build import build_context
from opdgraph.runtime.config_record import config_record
from opdgraph.runtime.context import RunContext, pick_device
from opdgraph.runtime.executor import PlanExecutor
from opdgraph.runtime.metrics import ProgressLine
from opdgraph.runtime.reporters import open_reporters
from opdgraph.runtime.run_checkpoints import restore, save_run_checkpoint
from opdgraph.runtime.run_directory import RunRequest, open_run_directory, resolve
from opdgraph.runtime.signals import (
    Interrupted,
    StopRequests,
    chosen_signal,
    signal_name,
)
from opdgraph.runtime.skipped_steps import stop_if_stuck
from opdgraph.stages import named_settings


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
        with open_reporters(cfg, plan, run_dir, resumed=checkpoint is not None) as reporters:  # [log] report_to
            ctx = _train(cfg, plan, run_dir, directory, checkpoint, stops, run_config, reporters,
                         record_memory=record_memory)
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
           run_config: dict | None, reporters, *, record_memory: bool) -> RunContext:
    ctx = build_context(cfg, plan, run_dir, resume_from=checkpoint, reporters=reporters)
    if directory is not None:
        directory.begin(cfg, plan)  # the first writes into the run directory: every check has passed
    distributed.barrier()
    if checkpoint is not None:
        restore(ctx, checkpoint)
        print(f"resumed at step {ctx.step} from {checkpoint}")
    stage_configs = {name: stage.config for name, stage in cfg.stages.items()}
    # The stages' own release hooks (the KV pools' engines) come from their modules (PlanExecutor).
    hooks = {ctx.facts["grads_buffer"]: ctx.optimizer.zero_grad}
    if ctx.facts["gather_per_step"]:  # the training loop ran on the weights gathered for rollout
        hooks[f"{cfg.model_with_role('student')}.gathered_weights"] = functools.partial(fsdp.end_step_gather,
                                                                                        ctx.student)
    if fsdp.is_sharded(ctx.teacher):  # its root stays gathered from teacher_score until the loss is done
        hooks[f"{next(iter(ctx.teachers.values())).spec.weights}.gathered_root"] = functools.partial(
            fsdp.reshard_forward_only, ctx.teacher)
    from opdgraph.runtime.evaluation import print_before_after

    recorder = None
    if record_memory:
        from opdgraph.runtime.memory_record import MemoryRecorder

        recorder = MemoryRecorder(plan, ctx.device, run_dir)
    executor = PlanExecutor(plan, stage_configs, ctx, release_hooks=hooks, memory_recorder=recorder)
    settings = {key: value for key, (_, value) in named_settings(cfg.stages, "run_settings").items()}
    log_every = settings.get("log_every_n_steps", 1)  # the log stage's (no [log] table: every step)
    if ctx.step == 0:  # a resumed run has had its "before"
        executor.run_before_training()  # eval's evaluation before training, with its step's releases
    progress = ProgressLine(cfg.pipeline.num_steps, first_step=ctx.step,
                            enabled=bool(settings.get("progress", True)) and distributed.is_main())
    saving = "checkpoint_keep_last" in settings  # a checkpoint stage asks for saves (ctx.checkpoint_due)
    stops.graceful = True  # from here a signal stops at the end of the step
    while ctx.step < cfg.pipeline.num_steps:
        started = time.perf_counter()
        ctx.stage_seconds, ctx.step_record, ctx.checkpoint_due = {}, {}, False
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        executor.run_training_step()
        own_signal, flags = stops.signum, stops.flags()  # what this rank sends; a later signal counts next step
        stop_votes = _sum_over_ranks(ctx.step_record, _RANK_SUMS, ctx.device, extra=flags)
        if "sft_loss" in ctx.step_record:  # hybrid SFT: the objective the backward differentiates
            ctx.step_record["total_loss"] = ctx.step_record["loss"] + ctx.step_record["sft_loss"]
        record = {"kind": "train", "step": ctx.step, **ctx.step_record,
                  "seconds": time.perf_counter() - started,
                  **{f"seconds/{name}": round(value, 6) for name, value in ctx.stage_seconds.items()}}
        if ctx.device.type == "cuda":
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
        ctx.metrics.write(record)
        if ctx.step % log_every == 0 or ctx.step == cfg.pipeline.num_steps:
            progress.update(ctx.step, {k: record[k] for k in ("loss", "grad_norm", "lr")
                                       if record.get(k) is not None})
        stop = chosen_signal(own_signal, stop_votes) if ctx.step < cfg.pipeline.num_steps else None
        if saving and (ctx.checkpoint_due or (stop is not None and settings["checkpoint_on_signal"])):
            save_run_checkpoint(ctx, keep_last=settings["checkpoint_keep_last"], run_config=run_config)
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

# Parts of global means (and each mixture teacher's divergence[<stage>]); the sft stage's terms too.
_RANK_SUMS = ("loss", "divergence", "sft_loss", "sft_cross_entropy")


def _sum_over_ranks(record: dict, keys: tuple[str, ...], device: torch.device, *, extra: list[float]) -> list[float]:
    """Each rank's loss is its part of the global mean (weights divide by global counts): the sum is the loss; so is
    a mixture teacher's `divergence[<stage>]` (routed ones are means of their own, on one process only). The
    `extra` numbers (the stop requests) ride in the same all-reduce; their sums are returned."""
    present = [key for key in keys if key in record]
    if distributed.world_size() > 1:
        present += [key for key in record if key.startswith("divergence[") and record[key] is not None]
    summed = distributed.all_reduce_sum([record[key] for key in present] + list(extra), device)
    for key, value in zip(present, summed):
        record[key] = value
    return summed[len(present):]

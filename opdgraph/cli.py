"""The `opdgraph` command line: `opdgraph plan P.toml`, `opdgraph config P.toml` and `opdgraph run P.toml`.

`run` takes the run-directory flags (their policy: opdgraph.runtime.run_directory): `--resume DIR` continues the run
in DIR, `--restart` starts over a run stopped before its first checkpoint, `--allow-config-change` accepts a resume
whose config changes the math, `--take-over-lock` takes over the lock a killed run left. SIGINT / SIGTERM stop a run
at the end of its current step, with a checkpoint and the command that resumes it.

Each subcommand is one entry in SUBCOMMANDS: a help line, a function that adds its arguments, and a function that
runs it and returns the exit code. Exit codes: 0 ok; 2 bad input (config, model or data files, run directory,
checkpoint, device) or a plan over the memory budget; 130 / 143 stopped by SIGINT / SIGTERM. Every user-facing error
is an OpdgraphError (opdgraph.errors): `main` prints it without a traceback (`--debug` shows one); any other
exception is a bug and keeps its traceback.

Several GPUs: `torchrun --nproc-per-node N -m opdgraph run P.toml` (the plan is compiled for WORLD_SIZE ranks);
`opdgraph plan P.toml --nproc-per-node N` shows that per-rank plan without launching anything.
"""

from __future__ import annotations

import argparse
import sys

from opdgraph.errors import EXIT_USER_ERROR, OpdgraphError

EXIT_CONFIG_ERROR = EXIT_USER_ERROR
EXIT_OVER_BUDGET = EXIT_USER_ERROR
EXIT_SIGNAL_BASE = 128  # stopped by signal N: exit 128 + N (SIGINT 130, SIGTERM 143), as shells report it


def _add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", help="pipeline TOML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (TOML literal, else a bare string); repeatable; wins over "
                             "the file")


def _load(args):
    from opdgraph.config import ConfigError, load_pipeline
    try:
        return load_pipeline(args.pipeline, args.overrides)
    except ConfigError as error:
        print(f"opdgraph: {len(error.problems)} config problem(s):\n{error}", file=sys.stderr)
        return None


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    _add_pipeline_arguments(parser)
    parser.add_argument("--format", choices=("text", "json", "html", "torch-snapshot"), default="text",
                        help="output format; torch-snapshot: the predicted schedule as a PyTorch memory snapshot "
                             "(a pickle for https://pytorch.org/memory_viz; needs --out)")
    parser.add_argument("--out", help="write to this file instead of stdout")
    parser.add_argument("--measured", metavar="RUN_DIR",
                        help="with --format html: draw the predicted-vs-measured memory of a run recorded with "
                             "`opdgraph run --record-memory` (RUN_DIR/memory.json) on the same page")
    parser.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                        help="plan one rank of an N-rank data-parallel run (sharded student, per-rank batch)")


def run_plan(args) -> int:
    from opdgraph.render import RENDERERS
    if args.measured and args.format != "html":
        raise OpdgraphError(f"--measured {args.measured}: only the html page draws a recorded run; add --format html")
    if args.format == "torch-snapshot" and not args.out:
        raise OpdgraphError("--format torch-snapshot writes a binary pickle: name the file with --out plan.pickle")
    cfg = _load(args)
    if cfg is None:
        return EXIT_CONFIG_ERROR
    fitted = _compile(cfg, args.nproc_per_node)
    if fitted is None:
        return EXIT_CONFIG_ERROR
    plan = fitted.plan  # the configured plan, or the fit search's choice when that is over budget
    if args.measured:
        from opdgraph.render.measured import read_measured

        output = RENDERERS["html"](plan, read_measured(args.measured))
    else:
        output = RENDERERS[args.format](plan)
    if args.out:
        _write_output(args.out, output)
    else:
        sys.stdout.write(output)
    if plan.over_budget:
        print(_over_budget_message(plan), file=sys.stderr)
        return EXIT_OVER_BUDGET
    return 0


def _write_output(path: str, text: str | bytes) -> None:
    import os

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OpdgraphError(f"--out {path}: the folder {folder} does not exist; create it first or choose another path")
    try:
        if isinstance(text, bytes):
            with open(path, "wb") as handle:
                handle.write(text)
        else:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text)
    except OSError as error:
        raise OpdgraphError(f"--out {path}: cannot write there ({error.strerror}); choose another path") from error


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    _add_pipeline_arguments(parser)


def run_config(args) -> int:
    from opdgraph.config import render_resolved

    cfg = _load(args)
    if cfg is None:
        return EXIT_CONFIG_ERROR
    sys.stdout.write(render_resolved(cfg))
    return 0


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    _add_pipeline_arguments(parser)
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", metavar="DIR",
                       help="continue the run in DIR (its run directory, or one checkpoint DIR/checkpoints/step-N) "
                            "from its newest intact checkpoint; DIR is where the run goes on writing")
    start.add_argument("--restart", action="store_true",
                       help="start over a run stopped before its first checkpoint: its files move to "
                            "previous-attempts/<time>/ inside its directory (refused when it has a checkpoint)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="with --resume: accept config changes that alter the math or the data order (each is "
                             "listed and recorded in config.toml)")
    parser.add_argument("--take-over-lock", action="store_true",
                        help="take over the run directory's lock when its holder is gone (a killed run) or on "
                             "another host; never from a live run on this host")
    parser.add_argument("--check", action="store_true",
                        help="run every startup check (config, plan, run directory, device, tokenizers, every "
                             "prompt row) without loading weights or writing anything, then exit")
    parser.add_argument("--record-memory", action="store_true",
                        help="measure device memory per plan step against the plan (memory.txt, memory.json and a "
                             "PyTorch memory snapshot in the run directory; CUDA only)")


def _over_budget_message(plan) -> str:
    from opdgraph.render.text import gib

    searched = ""
    if plan.fit:
        searched = (f"opdgraph: no candidate of the fit search ({plan.fit['candidates']} tried) fits; the closest "
                    f"is {plan.fit['described']}\n")
    largest = "; ".join(f"{name} {gib(size)} GiB (sized by {', '.join(plan.buffers[name].sized_by)})"
                        for name, size in plan.peak.contributors[:3])
    return searched + (f"opdgraph: predicted peak {gib(plan.peak_bytes)} GiB at step '{plan.peak.step}' exceeds "
            f"pipeline.memory_budget_gib = {gib(plan.budget_bytes)}. Largest buffers there: {largest}")


def _compile(cfg, world_size: int):
    """The fitted plan of one of `world_size` ranks, or None after printing why there cannot be that many. A setting
    that cannot be planned for that many ranks raises an OpdgraphError, which main prints; any other exception is a
    bug and keeps its traceback."""
    from opdgraph.fit import fit_plan

    if world_size < 1:
        print(f"opdgraph: --nproc-per-node must be at least 1, got {world_size}", file=sys.stderr)
        return None
    return fit_plan(cfg, world_size=world_size)


def _on_the_run_device(cfg):
    """pipeline.device = "auto" made the device this run takes (cuda where one is available, else cpu), so that the
    plan `run` executes sizes the paths that run there (the attention and linear-attention cores, the loss kernel,
    CUDA's overheads), not the CUDA plan that `plan` makes of "auto". A resume may change the device
    (runtime/config_record.py: a cadence key)."""
    if cfg.pipeline.device != "auto":
        return cfg
    import attrs

    from opdgraph.runtime.context import pick_device

    return attrs.evolve(cfg, pipeline=attrs.evolve(cfg.pipeline, device=pick_device("auto").type))


def run_run(args) -> int:
    import os

    cfg = _load(args)
    if cfg is None:
        return EXIT_CONFIG_ERROR
    cfg = _on_the_run_device(cfg)
    fitted = _compile(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # torchrun sets WORLD_SIZE for every rank
    if fitted is None:
        return EXIT_CONFIG_ERROR
    cfg, plan = fitted.cfg, fitted.plan  # the runtime runs the config with the fit decisions applied
    if plan.over_budget:
        print(_over_budget_message(plan), file=sys.stderr)
        return EXIT_OVER_BUDGET
    if args.check:
        from opdgraph.runtime.startup import check_run

        startup = check_run(cfg, resume=args.resume, restart=args.restart,
                            allow_config_change=args.allow_config_change, take_over_lock=args.take_over_lock)
        print(f"opdgraph run --check: every startup check passed ({len(startup.train_prompts)} train prompts, "
              f"device {startup.device.type}); nothing was written")
        return 0
    from opdgraph.runtime import distributed
    from opdgraph.runtime.run import run_pipeline

    rerun_args = ["run", args.pipeline, *(word for override in args.overrides for word in ("--set", override))]
    ctx = run_pipeline(cfg, plan, resume=args.resume, restart=args.restart,
                       allow_config_change=args.allow_config_change, take_over_lock=args.take_over_lock,
                       record_memory=args.record_memory, rerun_args=rerun_args)
    distributed.shutdown()
    return EXIT_SIGNAL_BASE + ctx.stopped_by if ctx.stopped_by is not None else 0


SUBCOMMANDS = {
    "plan": ("compile a pipeline and print its memory schedule and roofline times", add_plan_arguments, run_plan),
    "config": ("print the resolved config with where each value came from", add_config_arguments, run_config),
    "run": ("compile a pipeline and execute its plan: train", add_run_arguments, run_run),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opdgraph", description="On-policy distillation pipeline compiler")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _run) in SUBCOMMANDS.items():
        subparser = commands.add_parser(name, help=help_text, description=help_text)
        add_arguments(subparser)
        subparser.add_argument("--debug", action="store_true",
                               help="show the Python traceback of a user-facing error")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return SUBCOMMANDS[args.command][2](args)
    except OpdgraphError as error:
        if args.debug:
            raise
        print(f"opdgraph: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as error:  # Ctrl-C, or a second signal during a run (opdgraph.runtime.signals)
        if args.debug:
            raise
        import signal

        signum = getattr(error, "signum", signal.SIGINT)
        print(f"opdgraph: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        return EXIT_SIGNAL_BASE + signum

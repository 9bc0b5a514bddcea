"""The `opdgraph` command line: `opdgraph plan P.toml` and `opdgraph config P.toml` (more subcommands plug in).

Each subcommand is one entry in SUBCOMMANDS: a help line, a function that adds its arguments, and a function that
runs it and returns the exit code. Exit codes: 0 ok, 1 config error, 2 plan over the memory budget.
"""

from __future__ import annotations

import argparse
import sys

EXIT_CONFIG_ERROR = 1
EXIT_OVER_BUDGET = 2


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
    parser.add_argument("--format", choices=("text", "json", "html"), default="text", help="output format")
    parser.add_argument("--out", help="write to this file instead of stdout")


def run_plan(args) -> int:
    from opdgraph.fit import fit_plan
    from opdgraph.render import RENDERERS
    cfg = _load(args)
    if cfg is None:
        return EXIT_CONFIG_ERROR
    plan = fit_plan(cfg).plan  # the configured plan, or the fit search's choice when that is over budget
    output = RENDERERS[args.format](plan)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(output)
    else:
        sys.stdout.write(output)
    if plan.over_budget:
        print(_over_budget_message(plan), file=sys.stderr)
        return EXIT_OVER_BUDGET
    return 0


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
    parser.add_argument("--resume", metavar="DIR",
                        help="continue the run in DIR (a run directory or one checkpoint) from its newest checkpoint")


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


def run_run(args) -> int:
    from opdgraph.fit import fit_plan

    cfg = _load(args)
    if cfg is None:
        return EXIT_CONFIG_ERROR
    fitted = fit_plan(cfg)
    cfg, plan = fitted.cfg, fitted.plan  # the runtime runs the config with the fit decisions applied
    if plan.over_budget:
        print(_over_budget_message(plan), file=sys.stderr)
        return EXIT_OVER_BUDGET
    from opdgraph.runtime.run import run_pipeline

    run_pipeline(cfg, plan, resume=args.resume)
    return 0


SUBCOMMANDS = {
    "plan": ("compile a pipeline and print its memory schedule and roofline times", add_plan_arguments, run_plan),
    "config": ("print the resolved config with where each value came from", add_config_arguments, run_config),
    "run": ("compile a pipeline and execute its plan: train", add_run_arguments, run_run),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opdgraph", description="On-policy distillation pipeline compiler")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _run) in SUBCOMMANDS.items():
        add_arguments(commands.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return SUBCOMMANDS[args.command][2](args)

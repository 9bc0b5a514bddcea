"""The compiler stays generic: every stage kind plans its own steps and buffers (opdgraph.stages.<kind>), and
opdgraph.compile / opdgraph.buffers only walk the ordered stages."""

import ast
from pathlib import Path

import pytest

from opdgraph.compile import compile_plan
from opdgraph.config import load_pipeline
from opdgraph.stages import KIND_NAMES, SOURCE_KINDS, stage_kind

ROOT = Path(__file__).resolve().parents[1]
GENERIC_MODULES = ("opdgraph/compile.py", "opdgraph/buffers.py", "opdgraph/placement_steps.py", "opdgraph/counts.py",
                   "opdgraph/stage_plan.py", "opdgraph/render/text.py", "opdgraph/runtime/executor.py",
                   "opdgraph/runtime/offload.py", "opdgraph/runtime/run.py", "opdgraph/runtime/startup.py",
                   "opdgraph/planned_paths.py", "opdgraph/fit.py", "opdgraph/runtime/build.py",
                   "opdgraph/runtime/teachers.py", "opdgraph/runtime/hybrid.py", "opdgraph/runtime/reporters.py",
                   "opdgraph/runtime/config_record.py", "opdgraph/cuda_overheads.py")
KINDS = (*KIND_NAMES, *SOURCE_KINDS)


def _kind_branches(path: Path) -> list[str]:
    """Comparisons of a `kind` with a kind's name, stages_of_kind calls and lookups of a stage by its kind
    (`cfg.stage("rollout")`, `facts.stage_names["rollout"]`): the branches a kind's module should own (other
    settings that share a kind's name, such as student_gather = "step", are not kind branches)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            on_kind = any(isinstance(n, ast.Attribute) and n.attr == "kind" or isinstance(n, ast.Name) and n.id == "kind"
                          for o in operands for n in ast.walk(o))
            names = [n.value for o in operands for n in ast.walk(o) if isinstance(n, ast.Constant)]
            found += [f"line {node.lineno}: compares a kind with {name!r}" for name in names
                      if on_kind and name in KINDS]
        if isinstance(node, ast.Attribute) and node.attr == "stages_of_kind":
            found.append(f"line {node.lineno}: stages_of_kind")
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "stage" and any(
                isinstance(arg, ast.Constant) and arg.value in KINDS for arg in node.args):
            found.append(f"line {node.lineno}: cfg.stage({node.args[0].value!r})")
        if isinstance(node, ast.Subscript) and getattr(node.value, "attr", None) == "stage_names" and isinstance(
                node.slice, ast.Constant) and node.slice.value in KINDS:
            found.append(f"line {node.lineno}: stage_names[{node.slice.value!r}]")
    return found


@pytest.mark.parametrize("module", GENERIC_MODULES)
def test_generic_modules_have_no_kind_branch(module):
    """A branch on a stage kind crept back into the generic compiler: a new kind (or a second stage of one kind)
    would then need edits there instead of only in its own module and the registry."""
    assert _kind_branches(ROOT / module) == []


def test_every_kind_plans_its_own_steps():
    """A registered kind lacks its plan functions (the compiler would fail on the first pipeline that uses it)."""
    for kind in KIND_NAMES:
        registered = stage_kind(kind)
        assert callable(registered.plan_steps) and callable(registered.plan_buffers), kind


def test_plan_steps_come_from_each_stage_in_order():
    """The compiler dropped, reordered or renamed a stage's steps: the tiny plan's steps, after the data source, are
    exactly its stages' steps in graph order, each tagged with its own stage and kind."""
    cfg = load_pipeline(ROOT / "pipelines" / "tiny.toml", [])
    plan = compile_plan(cfg)
    expected = ["data.load", "rollout.prefill", "rollout.decode", "teacher_score", "loss.student_forward", "loss",
                "backward", "step", "eval", "checkpoint", "log"]
    assert [step.name for step in plan.steps] == expected
    assert all(step.kind == cfg.stages[step.stage].kind for step in plan.steps[1:])
    # periodic kinds (eval, checkpoint, log) declare it and stay out of the step time
    periodic = sum(step.work.seconds for step in plan.steps if step.kind in ("eval", "checkpoint", "log"))
    assert plan.step_seconds == pytest.approx(sum(step.work.seconds for step in plan.steps) - periodic)

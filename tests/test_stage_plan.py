"""The compiler stays generic: every stage kind plans its own steps and buffers (opdgraph.stages.<kind>), and
opdgraph.compile / opdgraph.buffers only walk the ordered stages."""

import ast
from pathlib import Path

import pytest

from opdgraph.compile import compile_plan
from opdgraph.config import load_pipeline
from opdgraph.stages import KIND_NAMES, SOURCE_KINDS, stage_kind

ROOT = Path(__file__).resolve().parents[1]
KINDS = (*KIND_NAMES, *SOURCE_KINDS)
# Every module of the package: the compiler, the runtime, and each stage kind's module (which may name its own kind
# only: a branch on another kind's name belongs in that kind's module).
MODULES = sorted(str(path.relative_to(ROOT)) for folder in ("opdgraph", "stages", "kernels")
                 for path in (ROOT / folder).rglob("*.py"))


def _kind_constants() -> set[str]:
    """Names bound at module level to a kind's name anywhere in the package (TEACHER_KIND = "teacher_score"): a
    comparison with one is a kind branch as much as one with the string itself."""
    names = set()
    for module in MODULES:
        for node in ast.parse((ROOT / module).read_text()).body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and node.value.value in KINDS:
                names.update(target.id for target in node.targets if isinstance(target, ast.Name))
    return names


def _kind_branches(path: Path, own_kind: str = "") -> list[str]:
    """Comparisons of a `kind` with a kind's name (or a constant bound to one), stages_of_kind calls and lookups of
    a stage by its kind (`cfg.stage("rollout")`, `facts.stage_names["rollout"]`): the branches a kind's module
    should own. `own_kind`: the kind of a stage module, which may name itself (other settings that share a kind's
    name, such as student_gather = "step", are not kind branches)."""
    found, constants = [], _kind_constants()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            on_kind = any(isinstance(n, ast.Attribute) and n.attr == "kind" or isinstance(n, ast.Name) and n.id == "kind"
                          for o in operands for n in ast.walk(o))
            names = [n.value for o in operands for n in ast.walk(o) if isinstance(n, ast.Constant)]
            names += [n.id for o in operands for n in ast.walk(o) if isinstance(n, ast.Name) and n.id in constants]
            found += [f"line {node.lineno}: compares a kind with {name!r}" for name in names
                      if on_kind and name != own_kind and (name in KINDS or name in constants)]
        if isinstance(node, ast.Attribute) and node.attr == "stages_of_kind":
            found.append(f"line {node.lineno}: stages_of_kind")
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "stage" and any(
                isinstance(arg, ast.Constant) and arg.value in KINDS and arg.value != own_kind for arg in node.args):
            found.append(f"line {node.lineno}: cfg.stage({node.args[0].value!r})")
        if isinstance(node, ast.Subscript) and getattr(node.value, "attr", None) == "stage_names" and isinstance(
                node.slice, ast.Constant) and node.slice.value in KINDS and node.slice.value != own_kind:
            found.append(f"line {node.lineno}: stage_names[{node.slice.value!r}]")
    return found


@pytest.mark.parametrize("module", MODULES)
def test_no_module_branches_on_another_kind(module):
    """A branch on a stage kind crept in outside that kind's module: a new kind (or a second stage of one kind)
    would then need edits there instead of only in its own module and the registry."""
    own = Path(module).stem if module.startswith("stages/") else ""
    assert _kind_branches(ROOT / module, own) == []


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

"""The compiler stays generic: every stage kind plans its own steps and buffers (opdgraph.stages.<kind>), and
opdgraph.compile / opdgraph.buffers only walk the ordered stages."""

import ast
import functools
from pathlib import Path

import pytest

from opdgraph.compile import compile_plan
from opdgraph.config import load_pipeline
from opdgraph.stages import KIND_NAMES, SOURCE_KINDS, stage_kind

ROOT = Path(__file__).resolve().parents[1]
KINDS = (*KIND_NAMES, *SOURCE_KINDS)
# The package's folders and the module names they install as (pyproject.toml's package-dir).
FOLDERS = {"opdgraph": "opdgraph", "stages": "opdgraph.stages", "kernels": "opdgraph.kernels"}


def _module_name(path: Path) -> str:
    folder, *parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join([FOLDERS[folder], *parts[:-1], *([] if parts and parts[-1] == "__init__" else parts[-1:])])


# Every module of the package: the compiler, the runtime, and each stage kind's module (which may name its own kind
# only: a branch on another kind's name belongs in that kind's module).
PATHS = {_module_name(path): path for folder in FOLDERS for path in (ROOT / folder).rglob("*.py")}
MODULES = sorted(PATHS)


def _own_kind(module: str) -> str:
    """The kind a stage module is for (opdgraph.stages.teacher_score -> teacher_score); "" for any other module."""
    package, _, stem = module.rpartition(".")
    return stem if package == "opdgraph.stages" and stem in KINDS else ""


def _kind_values(node: ast.expr) -> frozenset[str]:
    """The kind names a module-level value spells: a string, or a tuple, list or set of strings. A collection of
    every registered kind (the registry's KIND_NAMES) picks out none: testing membership in it is validation."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    kinds = frozenset(item.value for item in items if isinstance(item, ast.Constant) and item.value in KINDS)
    return frozenset() if kinds >= frozenset(KIND_NAMES) else kinds


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The module an `from X import ...` names, relative imports (`from .x import`) resolved against `module`."""
    if not node.level:
        return node.module or ""
    package = module.split(".")[: len(module.split(".")) - node.level + is_package]
    return ".".join([*package, *([node.module] if node.module else [])])


def _namespaces(trees: dict[str, ast.Module], packages: frozenset[str] = frozenset()) -> dict[str, tuple[dict, dict]]:
    """For each module (name -> parsed source; `packages`: those that are a package's __init__): the kind names its
    names stand for (names bound at module level to a kind's name or a collection of them, and names imported from
    a module of `trees` that binds or re-imports one, TEACHER_KIND = "teacher_score"), and the modules of `trees`
    its names stand for (`from opdgraph.stages import teacher_score`, `import opdgraph.graph as g`)."""
    values = {module: {} for module in trees}
    aliases = {module: {} for module in trees}
    for module, tree in trees.items():
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) and node.value is not None else []
            kinds = _kind_values(node.value) if targets else frozenset()
            values[module].update((target.id, kinds) for target in targets if kinds and isinstance(target, ast.Name))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in trees:
                        aliases[module][alias.asname or alias.name] = alias.name
            if isinstance(node, ast.ImportFrom):
                source = _absolute(module, module in packages, node)
                for alias in node.names:
                    if f"{source}.{alias.name}" in trees:
                        aliases[module][alias.asname or alias.name] = f"{source}.{alias.name}"
    changed = True
    while changed:  # an imported name may itself be an import of another module's constant: follow to a fixpoint
        changed = False
        for module, tree in trees.items():
            for node in ast.walk(tree):
                if not isinstance(node, ast.ImportFrom):
                    continue
                source = _absolute(module, module in packages, node)
                for alias in node.names:
                    kinds = values.get(source, {}).get(alias.name)
                    if kinds and values[module].get(alias.asname or alias.name) != kinds:
                        values[module][alias.asname or alias.name] = kinds
                        changed = True
    return {module: (values[module], aliases[module]) for module in trees}


def _dotted(node: ast.expr) -> str:
    """`a.b.c` for a chain of attributes on a name; "" for anything else."""
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return node.id if isinstance(node, ast.Name) else ""


def _kinds_named(node: ast.expr, module: str, namespaces: dict) -> frozenset[str]:
    """The kind names one expression stands for: a kind's name itself, a name bound to one (in the module or
    imported into it), or a module's constant reached through the module (`teacher_score.KIND`)."""
    values, aliases = namespaces[module]
    if isinstance(node, ast.Constant):
        return frozenset([node.value]) & frozenset(KINDS)
    if isinstance(node, ast.Name):
        return values.get(node.id, frozenset())
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        target = aliases.get(base, base)
        return namespaces[target][0].get(node.attr, frozenset()) if target in namespaces else frozenset()
    return frozenset()


def _kind_branches(module: str, tree: ast.Module, namespaces: dict) -> list[str]:
    """Comparisons of a `kind` with a kind's name (or a name that stands for one: _kinds_named), stages_of_kind
    calls and lookups of a stage by its kind (`cfg.stage("rollout")`, `facts.stage_names["rollout"]`): the branches
    a kind's module should own. A stage module may name its own kind (_own_kind); other settings that share a kind's
    name, such as student_gather = "step", are not kind branches (they are not compared with a kind)."""
    own_kind, found = _own_kind(module), []

    def other_kinds(node: ast.expr) -> list[str]:
        return sorted(_kinds_named(node, module, namespaces) - {own_kind})

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            on_kind = any(isinstance(n, ast.Attribute) and n.attr == "kind"
                          or isinstance(n, ast.Name) and n.id == "kind" for o in operands for n in ast.walk(o))
            names = sorted({name for o in operands for n in ast.walk(o) for name in other_kinds(n)})
            found += [f"line {node.lineno}: compares a kind with {name!r}" for name in names if on_kind]
        if isinstance(node, ast.Attribute) and node.attr == "stages_of_kind":
            found.append(f"line {node.lineno}: stages_of_kind")
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "stage":
            found += [f"line {node.lineno}: cfg.stage({name!r})" for arg in node.args for name in other_kinds(arg)]
        if isinstance(node, ast.Subscript) and getattr(node.value, "attr", None) == "stage_names":
            found += [f"line {node.lineno}: stage_names[{name!r}]" for name in other_kinds(node.slice)]
    return found


@functools.cache
def _package() -> tuple[dict[str, ast.Module], dict]:
    """The package's parsed modules and their namespaces, read and parsed once for all the parametrized cases."""
    trees = {module: ast.parse(path.read_text()) for module, path in PATHS.items()}
    packages = frozenset(module for module, path in PATHS.items() if path.name == "__init__.py")
    return trees, _namespaces(trees, packages)


@pytest.mark.parametrize("module", MODULES)
def test_no_module_branches_on_another_kind(module):
    """A branch on a stage kind crept in outside that kind's module: a new kind (or a second stage of one kind)
    would then need edits there instead of only in its own module and the registry."""
    trees, namespaces = _package()
    assert _kind_branches(module, trees[module], namespaces) == []


def _branches_of(sources: dict[str, str]) -> dict[str, list[str]]:
    """What the check finds in each module of a synthetic package (module name -> source text)."""
    trees = {module: ast.parse(text) for module, text in sources.items()}
    namespaces = _namespaces(trees)
    return {module: _kind_branches(module, tree, namespaces) for module, tree in trees.items()}


def test_the_kind_branch_check_flags_constants_bound_to_another_kind():
    """The check above would pass a kind branch spelled through a constant: a name bound to another kind's name,
    in the module itself, imported from another module (under an alias, relatively, through a re-import) or reached
    through a module, compared with a kind; and a stage module naming another kind by its own KIND-like constant."""
    sources = {
        "opdgraph.compile": 'FOO = "teacher_score"\nif stage.kind == FOO:\n    pass\n',
        "opdgraph.buffers": 'from opdgraph.stages.teacher_score import KIND as TEACHER\nok = stage.kind != TEACHER\n',
        "opdgraph.lifetime": 'from opdgraph.buffers import TEACHER\nok = step.kind in (TEACHER, "x")\n',
        "opdgraph.render": 'from opdgraph.stages import sft\nok = kind == sft.KIND\n',
        "opdgraph.counts": 'import opdgraph.graph\nok = node.kind == opdgraph.graph.DATA_NODE\n',
        "opdgraph.plan": 'TEACHERS = ("teacher_score", "sft")\nok = [s for s in stages if s.kind in TEACHERS]\n',
        "opdgraph.work": 'from opdgraph.compile import FOO\nname = facts.stage_names[FOO]\nstage = cfg.stage(FOO)\n',
        "opdgraph.graph": 'DATA_NODE = "data"\n',
        "opdgraph.stages.teacher_score": 'KIND = "teacher_score"\n',
        "opdgraph.stages.sft": 'KIND = "sft"\nOTHER = "rollout"\nok = stage.kind == OTHER\n',
        "opdgraph.stages.loss": 'from .sft import OTHER\nok = stage.kind == OTHER\n',
    }
    assert _branches_of(sources) == {
        "opdgraph.compile": ["line 2: compares a kind with 'teacher_score'"],
        "opdgraph.buffers": ["line 2: compares a kind with 'teacher_score'"],
        "opdgraph.lifetime": ["line 2: compares a kind with 'teacher_score'"],
        "opdgraph.render": ["line 2: compares a kind with 'sft'"],
        "opdgraph.counts": ["line 2: compares a kind with 'data'"],
        "opdgraph.plan": ["line 2: compares a kind with 'sft'", "line 2: compares a kind with 'teacher_score'"],
        "opdgraph.work": ["line 2: stage_names['teacher_score']", "line 3: cfg.stage('teacher_score')"],
        "opdgraph.graph": [],
        "opdgraph.stages.teacher_score": [],
        "opdgraph.stages.sft": ["line 3: compares a kind with 'rollout'"],
        "opdgraph.stages.loss": ["line 2: compares a kind with 'rollout'"],
    }


def test_the_kind_branch_check_lets_a_stage_module_name_its_own_kind():
    """The check above would fail a stage module for using its own KIND (stages/teacher_score.py derives its
    tables' names from it), or would judge a constant by its NAME instead of the kind it is bound to (KIND is
    "teacher_score" in one module and "sft" in another), or would flag an unrelated string, a setting that shares a
    kind's name but is not compared with a kind, or a check that a kind is registered at all."""
    sources = {
        "opdgraph.stages.teacher_score": 'KIND = "teacher_score"\nif stage.kind == KIND:\n    pass\n'
                                         'ok = kind == "teacher_score"\nname = facts.stage_names[KIND]\n',
        "opdgraph.stages.sft": 'from opdgraph.stages.teacher_score import KIND as TEACHER\nKIND = "sft"\n'
                               'ok = stage.kind == KIND\nbad = stage.kind == TEACHER\n',
        "opdgraph.compile": 'KIND = "not a kind"\nok = stage.kind == KIND\ngather = "step"\n'
                            'ok = student_gather == "step"\nok = stage.kind == other\n'
                            'from opdgraph.stages import KIND_NAMES\nok = kind not in KIND_NAMES\n',
        "opdgraph.stages": f"KIND_NAMES = {KIND_NAMES!r}\n",
    }
    assert _branches_of(sources) == {
        "opdgraph.stages.teacher_score": [],
        "opdgraph.stages.sft": ["line 4: compares a kind with 'teacher_score'"],
        "opdgraph.compile": [],
        "opdgraph.stages": [],
    }


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

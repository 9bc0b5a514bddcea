"""The config checks ask no stage kind by name: each kind's checks and load-time defaults live in its own module
(stages/<kind>.py's resolve_defaults, check_stages and check_pipeline hooks), so a new kind touches its module and
the registry only. A failure means a kind branch came back into opdgraph/config, or a kind's hook went missing.
"""

from __future__ import annotations

import pathlib
import re

from opdgraph.stages import stage_module

CONFIG = pathlib.Path(__file__).parent.parent / "opdgraph" / "config"
KIND_BRANCH = re.compile(r"""kind\s*(==|!=)\s*["']|\.kind\s+in\b""")


def test_config_package_has_no_kind_branches():
    """Fails if a module of opdgraph/config tests a stage's kind against a name (`kind == "eval"`)."""
    found = [f"{path.name}:{number}: {line.strip()}" for path in sorted(CONFIG.glob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), 1) if KIND_BRANCH.search(line)]
    assert not found, found


def test_kind_checks_live_in_their_modules():
    """Fails if a kind's config-time hook moved out of its module (the checks would silently stop running)."""
    hooks = {"rollout": ["check_pipeline"], "teacher_score": ["check_stages", "check_pipeline"],
             "eval": ["resolve_defaults", "check_pipeline"], "sft": ["check_pipeline"], "loss": ["check_pipeline"]}
    missing = [f"{kind}.{hook}" for kind, names in hooks.items() for hook in names
               if not callable(getattr(stage_module(kind), hook, None))]
    assert not missing, missing

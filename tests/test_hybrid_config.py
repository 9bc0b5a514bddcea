"""Bad hybrid SFT + OPD pipelines through the real command line: each exits 2 naming where and what to do.

Config values (a negative weight, a fraction of 0, a linear schedule without decay steps, decay steps on a constant
schedule), compositions (an unfused plan, a second sft stage, a micro-batch without room for the prefix, a prefix
past the models' positions) and data (a row without its gold solution: file:line).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from opdgraph.cli import main

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"

CASES = [  # (--set overrides, text the message must hold)
    (["sft.weight=-0.5"], "sft.weight: must be >= 0, got -0.5"),
    (["sft.gold_prefix_fraction=0.0"], "sft.gold_prefix_fraction: must be in (0, 1]"),
    (["sft.decay_steps=0"], "schedule = \"linear\" needs decay_steps > 0"),
    (["sft.schedule=constant"], "decay_steps applies to schedule = \"linear\" only"),
    (["sft.gold_prefix_max_tokens=0"], "sft.gold_prefix_max_tokens: must be > 0"),
    (["pipeline.fuse_training=false"], "[sft] trains in the fused micro-batch loop"),
    (["teacher_score.micro_batch_tokens=100"], "cannot hold one whole sequence of data.max_prompt_tokens + "
                                               "sft.gold_prefix_max_tokens + rollout.max_new_tokens = 120 tokens"),
    (["sft.gold_prefix_max_tokens=430"], "exceeds [models.student] max_position_embeddings (512); lower "
                                         "sft.gold_prefix_max_tokens to at most 416"),
    (["teacher_score.max_prompt_tokens=470", 'teacher_score.system_prompt="Be brief."'],
     "teacher_score.max_prompt_tokens + sft.gold_prefix_max_tokens + rollout.max_new_tokens = 526 exceeds "
     "[models.teacher] max_position_embeddings (512); lower sft.gold_prefix_max_tokens to at most 10"),
]


@pytest.mark.parametrize("overrides, message", CASES, ids=[case[0][0] for case in CASES])
def test_bad_hybrid_configs_exit_2(overrides, message, capsys):
    """Fails if a bad hybrid setting is accepted, or reported without its location and the fix."""
    args = ["plan", str(PIPELINES / "tiny_hybrid.toml")]
    for override in overrides:
        args += ["--set", override]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


def test_second_sft_stage_is_an_error(tmp_path, capsys):
    """Fails if two gold prefixes could be configured (the second sft table would silently win or collide)."""
    shutil.copytree(PIPELINES, tmp_path / "pipelines")
    pipeline = tmp_path / "pipelines" / "tiny_hybrid.toml"
    pipeline.write_text(pipeline.read_text() + '\n[more_sft]\nkind = "sft"\ngold_prefix_field = "solution"\n'
                                               'gold_prefix_max_tokens = 4\n')
    assert main(["plan", str(pipeline)]) == 2
    error = capsys.readouterr().err
    assert "[more_sft] is a second sft stage beside [sft]" in error or "written by both" in error


def test_row_without_gold_names_file_and_line(tmp_path, capsys):
    """Fails if a training row without the gold field is not a file:line error (exit 2) at run start."""
    shutil.copytree(PIPELINES, tmp_path / "pipelines")
    data = tmp_path / "pipelines" / "data" / "hybrid_train.jsonl"
    rows = data.read_text().splitlines()
    broken = json.loads(rows[2])
    del broken["solution"]
    data.write_text("\n".join([*rows[:2], json.dumps(broken), *rows[3:]]) + "\n")
    assert main(["run", str(tmp_path / "pipelines" / "tiny_hybrid.toml"), "--check", "--set",
                 "pipeline.device=cpu", "--set", f"pipeline.output_dir={tmp_path / 'run'}"]) == 2
    error = capsys.readouterr().err
    assert f"{data}:3: [sft] needs field 'solution' (its gold_prefix_field, set at tiny_hybrid.toml:43)" in error


def test_eval_rows_without_gold_are_accepted(tmp_path, capsys):
    """Fails if an eval row without the gold field stops the run: eval grades its accuracy with the gold prefix on
    the rows that have one, and its other metrics need none."""
    shutil.copytree(PIPELINES, tmp_path / "pipelines")
    data = tmp_path / "pipelines" / "data" / "hybrid_eval.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for row in rows[::2]:
        del row["solution"]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["run", str(tmp_path / "pipelines" / "tiny_hybrid.toml"), "--check", "--set",
                 "pipeline.device=cpu", "--set", f"pipeline.output_dir={tmp_path / 'run'}"]) == 0, \
        capsys.readouterr().err

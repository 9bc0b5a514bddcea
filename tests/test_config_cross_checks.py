"""Config checks across tables: the sampled_token estimator against rollout's sampling, and data files that exist.

A failure means `plan` accepts a pipeline whose loss is silently biased, or one whose prompt files are missing
(found only at run time, after the models are loaded).
"""

from __future__ import annotations

import pathlib

import pytest

from opdgraph.config import ConfigError, load_pipeline

TINY = pathlib.Path(__file__).parent.parent / "pipelines" / "tiny.toml"
SAMPLED = "loss.divergence=sampled_token"


@pytest.mark.parametrize("rollout, reason", [
    ("rollout.top_k=20", "top_k = 20"), ("rollout.top_p=0.9", "top_p = 0.9"), ("rollout.min_p=0.05", "min_p = 0.05"),
    ("rollout.greedy=true", "greedy = true"), ("rollout.temperature=0.7", "temperature = 0.7 (the loss uses 1.0)"),
])
def test_sampled_token_with_biased_rollouts_is_an_error_unless_allowed(rollout, reason):
    """If this fails, sampled_token trains on an estimate that is biased (tokens not drawn from the student at the
    loss temperature) without a word, or the explicit opt-in no longer works."""
    with pytest.raises(ConfigError) as caught:
        load_pipeline(str(TINY), [SAMPLED, rollout])
    [problem] = caught.value.problems
    assert problem.path == "loss.divergence" and problem.location == f"--set {SAMPLED}"
    assert reason in problem.message and "allow_biased_estimate = true" in problem.message
    load_pipeline(str(TINY), [SAMPLED, rollout, "loss.allow_biased_estimate=true"])


def test_sampled_token_with_plain_sampling_and_other_divergences_pass():
    """If this fails, the estimator check rejects an unbiased setup, or checks divergences it does not concern."""
    load_pipeline(str(TINY), [SAMPLED, "rollout.temperature=0.5", "loss.temperature=0.5"])
    load_pipeline(str(TINY), ["loss.divergence=reverse_kl", "rollout.top_k=20", "rollout.greedy=true"])


@pytest.mark.parametrize("override, path", [
    ('data.train_files=["data/nope.jsonl"]', "data.train_files[0]"),
    ('data.eval_files=["data/tiny_eval.jsonl", "data/missing_eval.jsonl"]', "data.eval_files[1]"),
    ('eval.files=["data"]', "eval.files[0]"),
    ("data.eval_files=[]", "data.eval_files"),
])
def test_missing_data_files_fail_plan(override, path):
    """If this fails, `plan` passes with a prompt file that does not exist (or is a folder), or with an [eval]
    table that has no files (eval then crashes at run time)."""
    with pytest.raises(ConfigError) as caught:
        load_pipeline(str(TINY), [override])
    [problem] = caught.value.problems
    assert problem.path == path and problem.location == f"--set {override}"
    if override == "data.eval_files=[]":  # the [eval] table is left with no files at all
        assert "[eval] has no prompt files" in problem.message
        return
    assert "does not exist" in problem.message or "is a directory" in problem.message
    assert str(TINY.parent) in problem.message  # says where it looked


def test_triton_loss_kernel_on_cpu_fails_plan():
    """If this fails, loss.kernel = "triton" with pipeline.device = "cpu" passes `plan` and the run fails at its first
    loss, after the models are loaded; or the check also rejects device = "auto" (decided where the run runs) or the
    other kernels."""
    with pytest.raises(ConfigError) as caught:
        load_pipeline(str(TINY), ["pipeline.device=cpu", "loss.kernel=triton"])
    [problem] = caught.value.problems
    assert problem.path == "loss.kernel" and problem.location == "--set loss.kernel=triton"
    assert "runs on CUDA only" in problem.message and 'set loss.kernel = "auto" or "torch"' in problem.message
    for overrides in (["pipeline.device=auto", "loss.kernel=triton"], ["pipeline.device=cuda", "loss.kernel=triton"],
                      ["pipeline.device=cpu", "loss.kernel=auto"], ["pipeline.device=cpu", "loss.kernel=torch"]):
        load_pipeline(str(TINY), overrides)


def test_liger_layer_kernels_on_cpu_fail_plan():
    """If this fails, models.<name>.kernels = "liger" with pipeline.device = "cpu" passes `plan` and the run fails at
    its first forward; or the check also rejects device = "auto" or the other choices, or a bad choice passes."""
    with pytest.raises(ConfigError) as caught:
        load_pipeline(str(TINY), ["pipeline.device=cpu", "models.teacher.kernels=liger"])
    [problem] = caught.value.problems
    assert problem.path == "models.teacher.kernels" and problem.location == "--set models.teacher.kernels=liger"
    assert "runs on CUDA only" in problem.message and 'models.teacher.kernels = "auto" or "torch"' in problem.message
    with pytest.raises(ConfigError) as caught:
        load_pipeline(str(TINY), ["models.student.kernels=triton"])
    [problem] = caught.value.problems
    assert problem.path == "models.student.kernels" and "liger" in problem.message
    for overrides in (["pipeline.device=auto", "models.student.kernels=liger"],
                      ["pipeline.device=cuda", "models.student.kernels=liger"],
                      ["pipeline.device=cpu", "models.student.kernels=auto"],
                      ["pipeline.device=cpu", "models.student.kernels=torch"]):
        load_pipeline(str(TINY), overrides)


def test_plan_and_the_config_record_find_a_home_relative_prompt_file(tmp_path, monkeypatch):
    """If this fails, `~/x.jsonl` passes `plan` (which looks in the home directory) while the run looks for a folder
    named `~` next to the pipeline file, or the checkpoint records the file as missing."""
    from opdgraph.config.paths import data_file_path
    from opdgraph.runtime.config_record import config_record
    from opdgraph.runtime.durable import file_digest

    monkeypatch.setenv("HOME", str(tmp_path))
    prompts = tmp_path / "prompts" / "x.jsonl"
    prompts.parent.mkdir()
    prompts.write_bytes((TINY.parent / "data" / "tiny_train.jsonl").read_bytes())
    cfg = load_pipeline(str(TINY), ['data.train_files=["~/prompts/x.jsonl"]'])
    assert data_file_path(cfg.base_dir, "~/prompts/x.jsonl") == str(prompts)
    assert data_file_path(cfg.base_dir, "data/../data/a.jsonl") == str(TINY.parent / "data" / "a.jsonl")
    recorded = config_record(cfg)["values"]['data.file_checksum["~/prompts/x.jsonl"]']
    assert recorded == file_digest(prompts)

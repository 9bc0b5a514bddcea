"""The fit search: decisions for table-driven budgets, the choice checked against brute force by one checker,
forcing and forbidding, config errors of [pipeline.fit], and the goldens of the Qwen3-4B <- Qwen3-14B plan."""

from __future__ import annotations

import pathlib
from types import SimpleNamespace

import pytest

from golden_helpers import check_golden
from opdgraph.cli import EXIT_OVER_BUDGET, main
from opdgraph.compile import compile_plan
from opdgraph.config import ConfigError, load_pipeline
from opdgraph.fit import Candidate, Decisions, apply_decisions, choose, fit_plan, search_space
from opdgraph.render import render_json, render_text

PIPELINES = pathlib.Path(__file__).parent.parent / "pipelines"
QWEN3 = str(PIPELINES / "qwen3_4b_from_14b.toml")
GIB = 1024**3


def load(*overrides):
    return load_pipeline(QWEN3, list(overrides))


def check_fit(cfg, result) -> None:
    """The one checker: recompile every candidate of the search space of `cfg` on its own; the chosen plan must
    fit and no fitting candidate may be predicted faster (when none fits, the result is the smallest peak); its live
    bytes must equal a sum over the buffers on the device, and every step touches only device or host buffers."""
    budget = result.plan.budget_bytes
    space = search_space(cfg) if result.searched else [result.decisions]
    plans = {d: compile_plan(apply_decisions(cfg, d), d.placement) for d in space}
    fitting = {d: plan for d, plan in plans.items() if plan.peak_bytes <= budget}
    if result.fits:
        assert result.plan.peak_bytes <= budget
        fastest = min(plan.step_seconds for plan in fitting.values())
        assert result.plan.step_seconds == pytest.approx(fastest, rel=1e-12)
    else:
        assert not fitting
        assert result.plan.peak_bytes == min(plan.peak_bytes for plan in plans.values())
    live = result.plan.live_buffers()
    for index, step in enumerate(result.plan.steps):
        assert step.live_bytes == sum(result.plan.buffers[name].bytes for name in live[index])
        for name in (*step.reads, *step.writes):
            assert name in live[index] or result.plan.buffers[name].device == "host", (step.name, name)


def fit(*overrides):
    cfg = load(*overrides)
    return cfg, fit_plan(cfg)


# budget GiB -> expected decisions (teacher, optimizer, checkpointing, micro-batch, chunk, seqs), or None if none fit.
# Reasoning: the student's training state is 68 GiB (weights 2, fp32 masters 4, moments 8 and fp32 gradient sums 4
# bytes per parameter) and the teacher 27.5 GiB.
BUDGET_CASES = {
    # 177 GiB fits as configured: no search, the configured plan.
    200: ("keep", "keep", False, 16384, 2048, 64),
    # Keeping the optimizer state (45 GiB) beside the weights and the fp32 gradients leaves no room for any teacher
    # placement, so the state goes to the host; the whole teacher then fits beside 4096-token micro-batches and
    # 2048-token loss chunks (compute bound: smaller micro-batches cost no time, checkpointing would cost a forward).
    72: ("keep", "offload", False, 4096, 2048, 64),
    # 60 GiB: the activations of 2048-token micro-batches (native GQA, the MLP's gate and up saved, not act(gate))
    # fit beside 1024-token loss chunks: no checkpointing needed, which would cost a forward.
    60: ("keep", "offload", False, 2048, 1024, 64),
    # Weights, fp32 gradients, the optimizer bucket and a streamed teacher's resident part need about 30.7 GiB:
    # nothing fits (with backward.grad_accumulation_dtype = "model" the bf16 gradients would fit 30 GiB).
    30: None,
    20: None,
}


@pytest.mark.parametrize("budget", list(BUDGET_CASES))
def test_decisions_for_budgets(budget):
    """If this fails, the search picks a different plan for a budget (or claims a fit that is not one), or the
    chosen plan is not the cheapest fitting candidate of a brute-force recompile of the whole space."""
    cfg, result = fit(f"pipeline.memory_budget_gib={budget}")
    expected = BUDGET_CASES[budget]
    if expected is None:
        assert not result.fits
    else:
        assert result.fits
        assert result.decisions == Decisions(
            teacher_weights=expected[0], optimizer_state=expected[1], activation_checkpointing=expected[2],
            micro_batch_tokens=expected[3], chunk_tokens=expected[4], max_num_seqs=expected[5])
    check_fit(cfg, result)


def test_choose_tie_breaks():
    """If this fails, the choice among equally fast plans is no longer: fewer offloads first, then search order;
    or a plan over budget can be chosen."""
    def candidate(teacher, seconds, peak):
        decisions = Decisions(teacher_weights=teacher, optimizer_state="keep", activation_checkpointing=False,
                              micro_batch_tokens=1, chunk_tokens=1, max_num_seqs=1)
        return Candidate(decisions, SimpleNamespace(step_seconds=seconds, peak_bytes=peak))
    table = [  # (candidates, budget, index of the expected choice or None)
        ([candidate("keep", 2.0, 10), candidate("offload", 1.0, 10)], 10, 1),  # faster wins
        ([candidate("offload", 1.0, 5), candidate("keep", 1.0, 9)], 10, 1),  # tie: fewer offloads
        ([candidate("keep", 1.0, 9), candidate("keep", 1.0, 5)], 10, 0),  # tie: search order
        ([candidate("keep", 1.0, 11), candidate("stream", 3.0, 10)], 10, 1),  # over budget never chosen
        ([candidate("keep", 1.0, 11)], 10, None),
    ]
    for candidates, budget, expected in table:
        chosen = choose(candidates, budget)
        assert chosen is (None if expected is None else candidates[expected])


def test_no_search_when_the_plan_fits():
    """If this fails, a plan that fits as configured is changed by the search (existing plans must stay as they
    were), or the search does not run when the fit table forces a decision."""
    result = fit_plan(load_pipeline(str(PIPELINES / "qwen25_1b5_from_7b.toml")))
    assert not result.searched and result.plan.fit is None and not result.plan.transfers
    forced = fit_plan(load_pipeline(str(PIPELINES / "qwen25_1b5_from_7b.toml"),
                                    ['pipeline.fit.optimizer_state="offload"']))
    assert forced.searched and forced.decisions.optimizer_state == "offload"
    _, disabled = fit("pipeline.fit.enabled=false")
    assert not disabled.searched and disabled.plan.over_budget


def test_forcing_and_forbidding():
    """If this fails, a forced decision is not the only value searched, a forbidden value is still tried, or a
    ladder given in the table is not used as given."""
    space = search_space(load('pipeline.fit.teacher_weights="offload"', 'pipeline.fit.forbid=["optimizer_state.keep"]',
                              "pipeline.fit.micro_batch_tokens=[2048, 1024]",
                              'pipeline.fit.activation_checkpointing="on"'))
    assert {d.teacher_weights for d in space} == {"offload"} and {d.optimizer_state for d in space} == {"offload"}
    assert {d.micro_batch_tokens for d in space} == {2048, 1024} and all(d.activation_checkpointing for d in space)
    cfg, result = fit('pipeline.fit.forbid=["teacher_weights.stream"]')
    assert result.fits and result.decisions.teacher_weights != "stream"
    check_fit(cfg, result)


def test_applied_config_is_what_the_plan_used():
    """If this fails, the config handed to the runtime differs from the one the chosen plan was compiled from
    (the runtime would run other sizes than the plan predicts)."""
    _, result = fit()
    assert result.cfg.stages["backward"].config.activation_checkpointing == result.decisions.activation_checkpointing
    assert result.cfg.stages["teacher_score"].config.micro_batch_tokens == result.decisions.micro_batch_tokens
    assert result.cfg.provenance["teacher_score.micro_batch_tokens"] == "fit"  # the search changed it
    recompiled = compile_plan(result.cfg, result.decisions.placement)
    assert recompiled.peak_bytes == result.plan.peak_bytes and recompiled.step_seconds == result.plan.step_seconds


def test_offload_transfers_are_counted():
    """If this fails, an offloaded placement stops charging its PCIe bytes: the state streams three times through
    the step (in for the optimizer's finiteness check, in and out for the update), the teacher's reload is charged
    once per step and its offload costs nothing."""
    _, result = fit('pipeline.fit.teacher_weights="offload"', 'pipeline.fit.optimizer_state="offload"')
    plan = result.plan
    state = plan.buffers["student.master_weights"].bytes + plan.buffers["student.optimizer_state"].bytes
    streamed = sum(t.bytes for t in plan.transfers if t.direction == "stream")
    assert streamed == 3 * state
    reloads = [t for t in plan.transfers if t.direction == "reload"]
    assert [(t.buffer, t.step, t.bytes) for t in reloads] == [("teacher.weights", "teacher_score",
                                                               plan.buffers["teacher.weights"].bytes)]
    assert all(t.bytes == 0 for t in plan.transfers if t.direction == "offload")
    assert plan.step("step").work.pcie_bytes == 3 * state


@pytest.mark.parametrize("settings, message", [
    (['pipeline.fit.teacher_weights="stram"'], "did you mean 'stream'"),
    (["pipeline.fit.activation_checkpointing=true"], "must be one of 'auto', 'on', 'off'"),
    (['pipeline.fit.forbid=["teacher_weight.stream"]'], "did you mean 'teacher_weights.stream'"),
    (["pipeline.fit.chunk_tokens=[1024, 0]"], "every value must be > 0"),
    (["pipeline.fit.micro_batch_token=[1024]"], "did you mean 'micro_batch_tokens'"),
    (['pipeline.fit.teacher_weights="stream"', 'pipeline.fit.forbid=["teacher_weights.stream"]'],
     "forced and also forbidden"),
    (['pipeline.fit.forbid=["optimizer_state.keep", "optimizer_state.offload"]'], "every value of optimizer_state"),
])
def test_fit_config_errors(settings, message):
    """If this fails, a mistake in [pipeline.fit] is accepted or its message stops saying what to fix."""
    with pytest.raises(ConfigError) as error:
        load(*settings)
    assert "pipeline.fit." in str(error.value) and message in str(error.value)


def test_cli_reports_the_choice_and_nothing_fits(capsys):
    """If this fails, `opdgraph plan` stops printing what the search chose, or a budget nothing fits no longer exits
    2 with the closest candidate and what is over."""
    assert main(["plan", QWEN3]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fit: chose teacher weights keep, optimizer state offload")
    assert "s/step without offload" in out
    assert "Host transfers" in out
    assert main(["plan", QWEN3, "--set", "pipeline.memory_budget_gib=20"]) == EXIT_OVER_BUDGET
    captured = capsys.readouterr()
    assert "fit: nothing fits; closest" in captured.out
    assert "the closest is" in captured.err and "exceeds pipeline.memory_budget_gib" in captured.err


def test_qwen3_plan_goldens():
    """If this fails, the plan the search chooses for Qwen3-4B <- Qwen3-14B changed: review the golden diffs."""
    _, result = fit()
    assert result.plan.peak_bytes <= 80 * GIB
    check_golden("plan_qwen3_4b_from_14b.txt", render_text(result.plan))
    check_golden("plan_qwen3_4b_from_14b.json", render_json(result.plan))

"""`opdgraph plan --format torch-snapshot` (opdgraph.render.torch_snapshot): the predicted schedule as a PyTorch
memory snapshot. Read back by torch's own snapshot readers (torch.cuda._memory_viz, which the memory_viz viewer's
Python side is), replayed here to check that the live memory at every step is the plan's and the peak is the plan's
peak, with frames that name the step and the buffer."""

from __future__ import annotations

import pickle

import pytest
from torch.cuda import _memory_viz

from opdgraph.cli import EXIT_CONFIG_ERROR, main
from plan_page_helpers import PIPELINES, fitted_plan

CASES = [("tiny.toml", []), ("qwen3_4b_from_14b.toml", []),
         ("qwen25_1b5_from_7b.toml", ["models.teacher.offload_when_idle=true"])]


def _snapshot(tmp_path, pipeline, overrides):
    out = tmp_path / "plan.pickle"
    sets = [word for override in overrides for word in ("--set", override)]
    assert main(["plan", str(PIPELINES / pipeline), *sets, "--format", "torch-snapshot", "--out", str(out)]) == 0
    with open(out, "rb") as handle:
        return pickle.load(handle)


def _replay(trace):
    """Live bytes after each event, by address: alloc adds, free_completed removes (what the viewer draws)."""
    live, after = {}, []
    for event in trace:
        if event["action"] == "alloc":
            assert event["addr"] not in live, "allocated twice without a free"
            live[event["addr"]] = event["size"]
        elif event["action"] == "free_completed":
            assert live.pop(event["addr"]) == event["size"]
        after.append((event, sum(live.values())))
    return live, after


@pytest.mark.parametrize("pipeline, overrides", CASES)
def test_snapshot_reads_back_and_peaks_at_the_plan_peak(tmp_path, pipeline, overrides):
    """If this fails, the snapshot is not one torch's readers accept, or the timeline it shows in memory_viz is not
    the plan's: another peak, another live size at some step, or events that do not name their step and buffer."""
    plan = fitted_plan(pipeline, overrides)
    snapshot = _snapshot(tmp_path, pipeline, overrides)
    assert "TOTAL MEM" in _memory_viz.trace(snapshot)
    assert "segments: 1" in _memory_viz.segsum(snapshot)
    flame = _memory_viz.memory(snapshot, format_flamegraph=lambda lines: lines)  # no flamegraph.pl download
    assert _memory_viz.segments(snapshot, format_flamegraph=lambda lines: lines)
    assert "<!DOCTYPE html>" in _memory_viz.trace_plot(snapshot)
    live, after = _replay(snapshot["device_traces"][0])
    assert max(total for _, total in after) == plan.peak_bytes
    for index, step in enumerate(plan.steps):  # live bytes once the step's allocations are in: the step's live_bytes
        allocated = [total for event, total in after if event["action"] == "alloc"
                     and f"step {index} {step.name} (" in event["frames"][0]["filename"]]
        if allocated:
            assert allocated[-1] == step.live_bytes, step.name
    for event, _ in after:
        assert event["frames"][0]["name"].split(" ")[0] in plan.buffers
    blocks = [block for block in snapshot["segments"][0]["blocks"] if block["state"] == "active_allocated"]
    assert sum(block["requested_size"] for block in blocks) == sum(live.values())
    assert sum(int(line.rsplit(" ", 1)[1]) for line in flame.splitlines() if ";active_allocated;" in line) \
        == sum(block["size"] for block in blocks)


def test_offload_is_a_free_and_reload_an_alloc(tmp_path):
    """If this fails, an offloaded buffer stays on the device in the snapshot (or a reload is not drawn)."""
    plan = fitted_plan(*CASES[2])
    snapshot = _snapshot(tmp_path, *CASES[2])
    teacher = [(event["action"], event["frames"][0]["filename"]) for event in snapshot["device_traces"][0]
               if event["frames"][0]["name"].startswith("teacher.weights ")]
    reload_step = next(step.name for step in plan.steps if "teacher.weights" in step.reloads)
    assert teacher[0][0] == "alloc" and f"{reload_step} (reloaded from host" in teacher[0][1]
    assert [action for action, where in teacher if "offloaded to host" in where] == ["free_requested",
                                                                                    "free_completed"]


def test_snapshot_needs_out(capsys):
    """If this fails, `--format torch-snapshot` without --out writes a binary pickle to the terminal."""
    assert main(["plan", str(PIPELINES / "tiny.toml"), "--format", "torch-snapshot"]) == EXIT_CONFIG_ERROR
    assert "--out plan.pickle" in capsys.readouterr().err

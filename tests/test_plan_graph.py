"""The stage graph: built from declared reads/writes (not table order), deterministic order, and its problems."""

from __future__ import annotations

import pathlib
import shutil

from opdgraph.compile import compile_plan
from opdgraph.config import load_pipeline
from opdgraph.graph import StageNode, build_stage_graph, graph_problems, stage_order

RANK = {"a": 0, "b": 1, "c": 2}


def test_order_follows_data_flow_not_insertion_order():
    """If this fails, stage order depends on the order tables appear in the file."""
    nodes = [StageNode("third", "c", ("y",), ("z",)), StageNode("second", "b", ("x",), ("y",)),
             StageNode("first", "a", ("prompts",), ("x",))]
    assert stage_order(build_stage_graph(nodes), RANK) == ["first", "second", "third"]
    assert stage_order(build_stage_graph(nodes[::-1]), RANK) == ["first", "second", "third"]


def test_independent_stages_tie_break_by_kind_then_name():
    """If this fails, stages with no data dependency between them come out in a non-deterministic order."""
    nodes = [StageNode("zeta", "a", ("prompts",), ()), StageNode("alpha", "b", ("prompts",), ()),
             StageNode("beta", "a", ("prompts",), ())]
    assert stage_order(build_stage_graph(nodes), RANK) == ["beta", "zeta", "alpha"]


def test_problems_name_both_ends():
    """If this fails, missing producers, double producers or cycles go unreported or unnamed."""
    nodes = [StageNode("p", "a", ("q_out",), ("p_out",)), StageNode("q", "b", ("p_out",), ("q_out",)),
             StageNode("r", "c", ("nothing",), ("p_out",))]
    messages = [message for _, message in graph_problems(build_stage_graph(nodes), {"maker": ("nothing",)})]
    assert "[r] reads 'nothing' but no stage writes it; add a [maker] table (kind 'maker' writes it)" in messages
    assert "'p_out' is written by both [p] and [r]; each value needs one producer" in messages
    assert any(message.startswith("stages form a cycle: [p] -> [q] -> [p]") for message in messages)


def test_table_order_does_not_change_the_plan(tmp_path):
    """If this fails, reordering stage tables in the TOML changes the compiled plan."""
    source = (pathlib.Path(__file__).parent.parent / "pipelines" / "tiny.toml").read_text()
    head, _, stages = source.partition("[rollout]")
    tables = ["[rollout]" + table for table in stages.split("\n[") if table][:1]
    tables += ["[" + table for table in stages.split("\n[")[1:]]
    reordered = tmp_path / "tiny.toml"
    reordered.write_text(head + "\n".join(reversed(tables)) + "\n")
    shutil.copytree(pathlib.Path(__file__).parent.parent / "pipelines" / "data", tmp_path / "data")  # must exist
    original = compile_plan(load_pipeline(str(pathlib.Path(__file__).parent.parent / "pipelines" / "tiny.toml")))
    shuffled = compile_plan(load_pipeline(str(reordered)))
    assert [step.name for step in shuffled.steps] == [step.name for step in original.steps]
    assert shuffled.peak_bytes == original.peak_bytes

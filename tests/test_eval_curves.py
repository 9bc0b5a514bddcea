"""The eval curves page (opdgraph.render.eval_curves): written into the run directory at the end of a run,
self-contained, and showing the numbers of metrics.jsonl's eval records."""

from __future__ import annotations

import json
import re
import xml.dom.minidom
from pathlib import Path

from opdgraph.compile import compile_plan
from opdgraph.config import load_pipeline
from opdgraph.render.eval_curves import PAGE_NAME, render_eval_curves, write_eval_curves
from opdgraph.runtime.degeneration import METRIC_KEYS
from opdgraph.runtime.run import run_pipeline

TINY = Path(__file__).resolve().parents[1] / "pipelines" / "tiny.toml"


def _record(step, label, kl, distinct_2, rate):
    return {"kind": "eval", "label": label, "step": step, "reverse_kl": kl, "forward_kl": kl * 1.5,
            "teacher_text_reverse_kl": kl * 2, "behaviour_rate": rate, "teacher_behaviour_rate": 0.875,
            "distinct_2": distinct_2, "teacher_distinct_2": 0.71, "repeat_run_mean": 1.25, "identical_share": 0.0,
            "num_prompts": 8}


def assert_self_contained(page: str) -> None:
    assert not re.search(r"\b(src|href)\s*=|@import|url\(|<link|<img|<iframe", page, re.I)
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) <= {"http://www.w3.org/2000/svg"}  # SVG's namespace
    xml.dom.minidom.parseString(page)  # well-formed: every tag closed, every entity escaped


def test_page_is_self_contained_and_shows_every_eval(tmp_path):
    """If this fails, the page fetches something from outside, is malformed, or lacks a chart or a number."""
    records = [_record(0, "before", 3.8612, 0.8123, 0.0), _record(20, "periodic", 2.5, 0.6, 0.5),
               _record(40, "final", 2.0734, 0.05, 0.75)]
    page = render_eval_curves(records, title="demo")
    assert_self_contained(page)
    for heading in ("KL to the teacher", "Behaviour rate", "Distinct-2"):
        assert f"<h2>{heading}" in page
    assert page.count("<polyline") == 7  # 3 KL series, 2 behaviour, 2 distinct-2
    for value in ("3.8612", "2.0734", "0.8123", "0.7500", "0.8750"):
        assert value in page
    assert "Degeneration warnings" in page and "below half its value before training" in page  # 0.05 vs 0.81


def test_page_without_behaviour_omits_that_chart(tmp_path):
    """If this fails, a run without `[eval] behaviour` gets an empty chart (or the page breaks)."""
    records = [{k: v for k, v in _record(0, "before", 1.0, 0.8, 0.0).items() if "behaviour" not in k}]
    page = render_eval_curves(records, title="t")
    assert "Behaviour rate" not in page and "KL to the teacher" in page and "No degeneration warning" in page
    assert write_eval_curves(tmp_path, "t") is None and not (tmp_path / PAGE_NAME).exists()  # no metrics: no page


def test_tiny_run_writes_the_page_with_its_metrics(tmp_path):
    """If this fails, a run no longer writes eval_curves.html, its eval records lack the degeneration or
    behaviour keys, or the page does not show the numbers metrics.jsonl holds."""
    cfg = load_pipeline(TINY, [f"pipeline.output_dir={tmp_path / 'run'}", "log.progress=false",
                               "pipeline.device=cpu", "pipeline.num_steps=2",
                               "eval.every_n_steps=1", "eval.behaviour=french", "checkpoint.every_n_steps=0"])
    run_pipeline(cfg, compile_plan(cfg))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    evals = [record for record in map(json.loads, lines) if record["kind"] == "eval"]
    assert [r["label"] for r in evals] == ["before", "periodic", "final"]
    for record in evals:
        keys = {*METRIC_KEYS, *(f"teacher_{key}" for key in METRIC_KEYS), "behaviour_rate", "teacher_behaviour_rate"}
        assert keys <= set(record)
        assert 0 <= record["distinct_2"] <= 1 and 0 <= record["behaviour_rate"] <= 1
    page = (tmp_path / "run" / PAGE_NAME).read_text()
    assert_self_contained(page)
    for record in evals:
        for key in ("reverse_kl", "distinct_2", "teacher_distinct_2", "behaviour_rate"):
            assert f"{record[key]:.4f}" in page, key

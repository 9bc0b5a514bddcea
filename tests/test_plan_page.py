"""The HTML plan page (opdgraph.render.html): every buffer and step on it, hover details with each buffer's formula
and where it is allocated and released, host transfers drawn on their steps, a GiB axis that matches the bars, the
measured table of a recorded run (`--measured`), and no external references. The rendering in a real browser (no
overlapping text) is tests/test_plan_page_browser.py."""

from __future__ import annotations

import json
import pathlib
import re
import xml.dom.minidom

import pytest

from opdgraph.cli import EXIT_CONFIG_ERROR, main
from opdgraph.render import render_html
from plan_page_helpers import PIPELINES, external_references, fitted_plan

GIB = 2**30
CASES = {  # name -> (pipeline, overrides): one with host streams (the fit search), one with offload/reload
    "qwen3_streams": ("qwen3_4b_from_14b.toml", []),
    "qwen25_offload": ("qwen25_1b5_from_7b.toml", ["models.teacher.offload_when_idle=true"]),
    "tiny": ("tiny.toml", []),
}


def _plan(name):
    pipeline, overrides = CASES[name]
    return fitted_plan(pipeline, overrides)


def _details(html):
    return json.loads(re.search(r'<script type="application/json" id="buffer-details">(.*?)</script>', html,
                                re.S).group(1))


def _svg(html, svg_id):
    start = html.index(f'<svg xmlns="http://www.w3.org/2000/svg" id="{svg_id}"')
    return xml.dom.minidom.parseString(html[start:html.index("</svg>", start) + 6]).documentElement


@pytest.mark.parametrize("name", list(CASES))
def test_every_buffer_and_step_with_hover_details(name):
    """If this fails, a buffer or step is missing from the page, or pointing at a buffer no longer shows its size,
    formula, sizing keys and the steps that allocate and release it."""
    plan = _plan(name)
    html = render_html(plan)
    details = _details(html)
    assert set(details) == set(plan.buffers)
    shapes = set(re.findall(r'data-buffer="([^"]+)"', html))
    assert shapes == set(plan.buffers)  # every buffer can be pointed at (at least its row label)
    for step in plan.steps:
        assert f"<td>{step.name}</td>" in html.replace('<td class="text">', "<td>")
    for name_, buffer in plan.buffers.items():
        text = "\n".join(details[name_]["lines"])
        assert f"formula: {buffer.formula or 'n/a'}" in text
        assert f"{buffer.bytes:,} bytes" in text
        for key in buffer.sized_by:
            assert key in text
    for index, step in enumerate(plan.steps):  # allocated / released at, from the plan's own step records
        for buffer in (*step.allocates, *step.reloads):
            assert f"before {index} {step.name}" in details[buffer]["allocated"]
        for release in step.releases:
            assert f"after {index} {step.name}" in details[release.buffer]["released"]


@pytest.mark.parametrize("name", ["qwen3_streams", "qwen25_offload"])
def test_transfers_drawn_on_their_steps(name):
    """If this fails, a host transfer (the teacher's reload / offload, a stream of the optimizer state) is no longer
    drawn on the step where it happens, in both the memory chart's lane and the buffer's lifetime row."""
    plan = _plan(name)
    assert plan.transfers
    html = render_html(plan)
    for svg_id in ("memory-chart", "lifetime-chart"):
        drawn = [rect.getElementsByTagName("title")[0].firstChild.data
                 for rect in _svg(html, svg_id).getElementsByTagName("rect")
                 if rect.getAttribute("class") == "transfer"]
        assert len(drawn) == len(plan.transfers)
        for transfer in plan.transfers:
            assert any(f"{transfer.direction} {transfer.buffer} {transfer.when} {transfer.step}:" in title
                       for title in drawn)


def test_gib_axis_matches_the_bars():
    """If this fails, the memory chart's GiB axis does not measure its bars: the peak bar's height read on the axis
    is not the plan's peak."""
    plan = _plan("qwen3_streams")
    svg = _svg(render_html(plan), "memory-chart")
    ticks = [(float(text.firstChild.data), float(text.getAttribute("y"))) for text in svg.getElementsByTagName("text")
             if text.getAttribute("text-anchor") == "end" and re.fullmatch(r"[0-9.]+", text.firstChild.data)]
    assert ticks[0][0] == 0 and len(ticks) >= 4 and ticks[-1][0] >= plan.peak_bytes / GIB * 0.9
    pixels_per_gib = (ticks[0][1] - ticks[-1][1]) / ticks[-1][0]
    peak_index = [step.name for step in plan.steps].index(plan.peak.step)
    column = [rect for rect in svg.getElementsByTagName("rect") if rect.getAttribute("class") != "transfer"
              and rect.getElementsByTagName("title")[0].firstChild.data.startswith(f"{plan.peak.step}:")]
    height = sum(float(rect.getAttribute("height")) for rect in column)
    assert height / pixels_per_gib == pytest.approx(plan.peak_bytes / GIB, abs=0.05)
    assert len(column) == len([name for name in plan.live_buffers()[peak_index] if plan.buffers[name].bytes])


@pytest.mark.parametrize("name", list(CASES))
def test_no_external_references(name):
    """If this fails, the page loads something from outside itself (a CDN script, a web font, a stylesheet) and no
    longer opens offline."""
    html = render_html(_plan(name))
    assert external_references(html) == []
    body = html[html.index("<body>"):html.index("</html>")]
    xml.dom.minidom.parseString(body)  # well-formed, so the XML tools in the other tests read it


def test_the_reference_finder_finds_references():
    """If this fails, test_no_external_references passes vacuously: its finder misses a kind of reference."""
    page = ('<link rel="stylesheet" href="a.css"><script src="https://cdn.example/x.js"></script>'
            '<img src="//host/a.png"><div style="background:url(https://x/y.png)"></div>'
            "<style>@import 'f.css'; p{background:url('https://x/z.png')}</style><a href='http://x'>x</a>")
    assert len(external_references(page)) == 8  # the script is found twice: as <script src> and as src=


def _write_memory_json(run_dir, plan, measured_factor=0.9):
    rows = [{"step": step.name, "predicted_gib": step.live_bytes / GIB,
             "measured_gib": step.live_bytes / GIB * measured_factor} for step in plan.steps]
    run_dir.mkdir()
    (run_dir / "memory.json").write_text(json.dumps(rows))


def test_measured_table_on_the_page(tmp_path):
    """If this fails, `--measured RUN_DIR` no longer draws a recorded run's measured peaks on the page: the table
    with one row per step and the measured markers in the memory chart."""
    plan = fitted_plan("tiny.toml")
    _write_memory_json(tmp_path / "run", plan)
    out = tmp_path / "plan.html"
    assert main(["plan", str(PIPELINES / "tiny.toml"), "--format", "html", "--measured", str(tmp_path / "run"),
                 "--out", str(out)]) == 0
    html = out.read_text()
    table = html[html.index('<table id="measured">'):]
    table = table[:table.index("</table>")]
    assert table.count("<tr>") == len(plan.steps) + 1
    for step in plan.steps:
        assert f"{step.live_bytes / GIB * 0.9:.2f}" in table
    assert f"<td>{1 / 0.9:.2f}</td>" in table  # predicted / measured
    assert html.count('class="measured"') == len(plan.steps)
    assert "Predicted vs measured" not in render_html(plan)


@pytest.mark.parametrize("setup, args, message", [
    ("none", ["--format", "html"], "no such run directory"),
    ("empty", ["--format", "html"], "memory.json does not exist"),
    ("bad_json", ["--format", "html"], "memory.json:1: not valid JSON"),
    ("bad_row", ["--format", "html"], "row 2: 'measured_gib' is neither a number nor null"),
    ("good", ["--format", "json"], "add --format html"),
    ("good", ["--format", "torch-snapshot"], "add --format html"),
])
def test_measured_errors(tmp_path, capsys, setup, args, message):
    """If this fails, a wrong --measured directory or file is not reported with its path and what to do."""
    run_dir = tmp_path / "run"
    if setup != "none":
        run_dir.mkdir()
    rows = [{"step": "a", "predicted_gib": 1.0, "measured_gib": None}, {"step": "b", "predicted_gib": 1.0,
                                                                       "measured_gib": "2"}]
    if setup == "bad_json":
        (run_dir / "memory.json").write_text("{oops")
    if setup in ("bad_row", "good"):
        (run_dir / "memory.json").write_text(json.dumps(rows if setup == "bad_row" else rows[:1]))
    code = main(["plan", str(PIPELINES / "tiny.toml"), *args, "--measured", str(run_dir),
                 "--out", str(tmp_path / "out")])
    assert code == EXIT_CONFIG_ERROR
    assert message in capsys.readouterr().err
    assert not pathlib.Path(tmp_path / "out").exists()

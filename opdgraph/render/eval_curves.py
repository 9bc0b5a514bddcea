"""The eval curves of a run as one self-contained HTML page (`<run dir>/eval_curves.html`), written when a run ends.

Read from the run's metrics.jsonl (its `eval` records, so a resumed run's page covers the whole run): KL to the
teacher by step (reverse and forward KL on the student's answers, reverse KL on the teacher's answers), the
behaviour rate of the student's answers with the teacher's as the ceiling (when eval has a `behaviour`), and
distinct-2 of the student's answers with the teacher's as the reference; then the degeneration warnings of each
eval (opdgraph.runtime.degeneration, relative to the first eval) and a table of every number of every eval record.
Inline SVG and CSS only: nothing is fetched, so the page opens offline or as an attachment. Torch-free.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

from opdgraph.render.html import STYLE
from opdgraph.render.html_charts import _tick_step
from opdgraph.runtime.degeneration import warning_line

PAGE_NAME = "eval_curves.html"
CHARTS = [  # (title, y-axis label, top of the axis (None: from the data), [(record key, legend, color, dashed)])
    ("KL to the teacher", "nats per token", None, [
        ("reverse_kl", "reverse KL, student's answers", "#4e79a7", False),
        ("forward_kl", "forward KL, student's answers", "#f28e2b", False),
        ("teacher_text_reverse_kl", "reverse KL, teacher's answers", "#59a14f", True)]),
    ("Behaviour rate", "share of answers", 1.0, [
        ("behaviour_rate", "student", "#e15759", False),
        ("teacher_behaviour_rate", "teacher (ceiling)", "#79706e", True)]),
    ("Distinct-2 (diversity of answers)", "unique bigrams / bigrams", 1.0, [
        ("distinct_2", "student", "#b07aa1", False),
        ("teacher_distinct_2", "teacher (reference)", "#79706e", True)]),
]
WIDTH, HEIGHT, LEFT, TOP, BOTTOM = 560, 220, 70, 16, 40


def read_eval_records(metrics_path: Path) -> list[dict]:
    with open(metrics_path, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return [record for record in records if record.get("kind") == "eval"]


def _chart(title: str, axis_label: str, axis_top: float | None, series: list, records: list[dict]) -> str:
    points = {key: [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
              for key, *_ in series}
    values = [value for pairs in points.values() for _, value in pairs]
    if not values:
        return ""
    steps = [r["step"] for r in records]
    first, last = min(steps), max(steps)
    top = axis_top if axis_top is not None else max(max(values) * 1.1, 1e-9)
    tick = _tick_step(top)

    def x(step):
        return LEFT + (0.5 if last == first else (step - first) / (last - first)) * (WIDTH - LEFT - 20)

    def y(value):
        return TOP + HEIGHT - max(value, 0) / top * HEIGHT

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="curve" width="{WIDTH}" height="{TOP + HEIGHT + BOTTOM}"'
             f' font-family="sans-serif">']
    for index in range(int(top / tick) + 1):
        ty = y(index * tick)
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - 20}" y1="{ty:.1f}" y2="{ty:.1f}" stroke="#ddd"/>'
                     f'<text x="{LEFT - 4}" y="{ty + 4:.1f}" font-size="11" text-anchor="end">{index * tick:g}</text>')
    for step in sorted(set(steps)):
        parts.append(f'<text x="{x(step):.1f}" y="{TOP + HEIGHT + 16}" font-size="11" text-anchor="middle">{step}'
                     f"</text>")
    middle = TOP + HEIGHT / 2
    parts.append(f'<text x="{LEFT / 2 - 14:.0f}" y="{middle:.0f}" font-size="11" text-anchor="middle" '
                 f'transform="rotate(-90 {LEFT / 2 - 14:.0f} {middle:.0f})">{escape(axis_label)}</text>'
                 f'<text x="{(LEFT + WIDTH - 20) / 2:.0f}" y="{TOP + HEIGHT + 34}" font-size="11" '
                 f'text-anchor="middle">training step</text>'
                 f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{TOP + HEIGHT}" stroke="#444"/>'
                 f'<line x1="{LEFT}" x2="{WIDTH - 20}" y1="{TOP + HEIGHT}" y2="{TOP + HEIGHT}" stroke="#444"/>')
    legend = []
    for key, name, color, dashed in series:
        pairs = points[key]
        if not pairs:
            continue
        dash = ' stroke-dasharray="5 3"' if dashed else ""
        path = " ".join(f"{x(step):.1f},{y(value):.1f}" for step, value in pairs)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        for step, value in pairs:
            parts.append(f'<circle cx="{x(step):.1f}" cy="{y(value):.1f}" r="3.5" fill="{color}">'
                         f"<title>{escape(name)} at step {step}: {value:.4f}</title></circle>")
        legend.append(f'<span><i class="swatch" style="background:{color}"></i>{escape(name)}</span>')
    return f'<h2>{escape(title)}</h2><div class="legend">{"".join(legend)}</div>' + "".join(parts) + "</svg>"


def _table(records: list[dict]) -> str:
    keys = sorted({key for r in records for key, value in r.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"})
    head = "<tr><th class=\"text\">metric</th>" + "".join(
        f"<th>{escape(r['label'])} {r['step']}</th>" for r in records) + "</tr>"
    rows = "".join(f'<tr><td class="text">{escape(key)}</td>' + "".join(
        f"<td>{_number(r.get(key))}</td>" for r in records) + "</tr>" for key in keys)
    return f'<table id="eval-records">{head}{rows}</table>'


def _number(value) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def render_eval_curves(records: list[dict], *, title: str) -> str:
    """The page for `records`, the eval records of one run in step order."""
    first = records[0] if records and records[0].get("label") == "before" else None
    warnings = [f"<li>{escape(r['label'])} (step {r['step']}): {escape(line)}</li>" for r in records
                if "distinct_2" in r and (line := warning_line(r, first))]
    warned = (f'<h2>Degeneration warnings</h2><ul class="warn">{"".join(warnings)}</ul>' if warnings
              else "<p>No degeneration warning: the student's answers did not collapse by the thresholds of "
                   "opdgraph.runtime.degeneration.</p>")
    charts = "".join(_chart(*chart, records) for chart in CHARTS)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"/><title>opdgraph eval curves: {escape(title)}</title>
<style>{STYLE}
svg.curve{{display:block;margin-bottom:8px}}ul.warn{{color:#b00}}</style></head><body>
<h1>opdgraph eval curves: {escape(title)}</h1>
<p>{len(records)} evals on held-out prompts, from metrics.jsonl. Point at a dot for its value.</p>
{charts}
{warned}
<h2>Every eval record</h2>
{_table(records)}
</body></html>
"""


def write_eval_curves(run_dir: Path, title: str) -> Path | None:
    """Write `<run_dir>/eval_curves.html` from its metrics.jsonl; None (nothing written) when it has no eval."""
    metrics = Path(run_dir) / "metrics.jsonl"
    records = read_eval_records(metrics) if metrics.is_file() else []
    if not records:
        return None
    path = Path(run_dir) / PAGE_NAME
    path.write_text(render_eval_curves(records, title=title), encoding="utf-8")
    return path

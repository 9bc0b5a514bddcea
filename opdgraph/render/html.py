"""`opdgraph plan --format html`: one self-contained HTML file (inline SVG and CSS, no scripts, no network).

Top chart: live device memory per step, stacked by buffer category, with the budget line and the peak marked.
Bottom chart: buffer lifetimes (one row per buffer, a bar over the steps where it is on the device).
Every bar has a <title>, which browsers show as a tooltip.
"""

from __future__ import annotations

from html import escape

from opdgraph.plan import CATEGORIES, Plan

GIB = 1024**3
COLORS = dict(zip(CATEGORIES, ("#4e79a7", "#a0cbe8", "#f28e2b", "#ffbe7d", "#59a14f", "#8cd17d", "#b6992d",
                               "#e15759", "#bab0ac", "#d37295")))
LEFT, TOP, STEP_WIDTH, CHART_HEIGHT, ROW_HEIGHT = 230, 30, 64, 300, 18


def _rect(x, y, width, height, color, tooltip) -> str:
    return (f'<rect x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" height="{height:.1f}" fill="{color}">'
            f"<title>{escape(tooltip)}</title></rect>")


def _memory_chart(plan: Plan, live: list[tuple[str, ...]]) -> str:
    top = max(plan.peak_bytes, plan.budget_bytes) * 1.05 or 1
    scale = CHART_HEIGHT / top
    width = LEFT + STEP_WIDTH * len(plan.steps) + 20
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{CHART_HEIGHT + TOP + 120}">']
    for index, step in enumerate(plan.steps):
        x, base = LEFT + index * STEP_WIDTH + 6, TOP + CHART_HEIGHT
        by_category = {}
        for name in live[index]:
            by_category.setdefault(plan.buffers[name].category, []).append(name)
        for category in CATEGORIES:
            names = by_category.get(category, [])
            size = sum(plan.buffers[name].bytes for name in names)
            if not size:
                continue
            height = size * scale
            base -= height
            tooltip = f"{step.name}: {category} {size / GIB:.3f} GiB ({', '.join(sorted(names))})"
            parts.append(_rect(x, base, STEP_WIDTH - 12, height, COLORS[category], tooltip))
        label_y = TOP + CHART_HEIGHT + 14
        parts.append(f'<text x="{x}" y="{label_y}" font-size="10" transform="rotate(30 {x} {label_y})">'
                     f"{escape(step.name)}</text>")
        if step.name == plan.peak.step:
            parts.append(f'<text x="{x}" y="{base - 4:.1f}" font-size="11">peak {step.live_bytes / GIB:.2f} GiB</text>')
    budget_y = TOP + CHART_HEIGHT - plan.budget_bytes * scale
    parts.append(f'<line x1="{LEFT}" x2="{width - 10}" y1="{budget_y:.1f}" y2="{budget_y:.1f}" stroke="#c00" '
                 f'stroke-dasharray="6 4"><title>budget {plan.budget_bytes / GIB:.2f} GiB</title></line>')
    parts.append(f'<text x="10" y="{budget_y + 4:.1f}" font-size="11" fill="#c00">budget '
                 f"{plan.budget_bytes / GIB:.2f} GiB</text>")
    for row, category in enumerate(CATEGORIES):
        y = TOP + 14 * row
        parts.append(f'<rect x="10" y="{y}" width="10" height="10" fill="{COLORS[category]}"/>'
                     f'<text x="26" y="{y + 9}" font-size="11">{category}</text>')
    return "".join(parts) + "</svg>"


def _lifetime_chart(plan: Plan, live: list[tuple[str, ...]]) -> str:
    names = sorted(plan.buffers, key=lambda name: (plan.buffers[name].lifetime != "held",
                                                   next((i for i, names in enumerate(live) if name in names), 99),
                                                   name))
    width = LEFT + STEP_WIDTH * len(plan.steps) + 20
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{TOP + ROW_HEIGHT * len(names) + 10}">']
    for index, step in enumerate(plan.steps):
        parts.append(f'<text x="{LEFT + index * STEP_WIDTH + 4}" y="{TOP - 8}" font-size="10">{index}'
                     f"<title>{escape(step.name)}</title></text>")
    for row, name in enumerate(names):
        buffer = plan.buffers[name]
        y = TOP + row * ROW_HEIGHT
        parts.append(f'<text x="10" y="{y + 12}" font-size="11">{escape(name)}</text>')
        for index, step in enumerate(plan.steps):
            if name in live[index]:
                tooltip = (f"{name} ({buffer.category}, {buffer.lifetime}) {buffer.bytes / GIB:.3f} GiB at "
                           f"{step.name}; {buffer.formula}; sized by {', '.join(buffer.sized_by)}")
                parts.append(_rect(LEFT + index * STEP_WIDTH, y + 2, STEP_WIDTH - 1, ROW_HEIGHT - 4,
                                   COLORS[buffer.category], tooltip))
    return "".join(parts) + "</svg>"


def render_html(plan: Plan) -> str:
    live = plan.live_buffers()
    mode = "fused training loop" if plan.fused else "unfused"
    rows = "".join(f"<tr><td>{index}</td><td>{escape(step.name)}</td><td>{step.scope}</td><td>{step.repeats}</td>"
                   f"<td>{step.live_bytes / GIB:.2f}</td><td>{step.work.seconds * 1e3:.3f}</td></tr>"
                   for index, step in enumerate(plan.steps))
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>opdgraph plan: {escape(plan.name)}</title>
<style>body{{font-family:sans-serif;margin:20px}} td,th{{padding:2px 10px;text-align:right}}
td:nth-child(2){{text-align:left}}</style></head><body>
<h1>opdgraph plan: {escape(plan.name)}</h1>
<p>{mode}; peak {plan.peak_bytes / GIB:.2f} GiB at <b>{escape(plan.peak.step)}</b>; budget
{plan.budget_bytes / GIB:.2f} GiB; roofline time per training step {plan.step_seconds:.3f} s</p>
<h2>Live device memory by category</h2>
{_memory_chart(plan, live)}
<h2>Buffer lifetimes</h2>
{_lifetime_chart(plan, live)}
<h2>Steps</h2>
<table><tr><th>#</th><th>step</th><th>scope</th><th>runs</th><th>live GiB</th><th>roofline ms</th></tr>{rows}</table>
</body></html>
"""

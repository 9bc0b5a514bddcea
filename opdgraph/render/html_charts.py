"""The two inline SVG charts of the plan page (opdgraph.render.html); plain strings, no torch.

Memory chart: live device memory per step, stacked by buffer category, on a GiB axis, with the budget line (its label
in the right margin, clear of the bars), the peak, the measured peaks of a recorded run when given, and a lane under
the bars with the host transfers (reload, offload, stream) and interconnect exchanges of each step. Step names are
written vertically under their bar so long names never run into each other.
Lifetime chart: one row per buffer, a cell per step where it is on the device, transfer markers on the steps where
the buffer moves. Every buffer shape carries data-buffer (the page's hover details) and a <title> (the fallback).
"""

from __future__ import annotations

from html import escape

from opdgraph.plan import CATEGORIES, Plan

GIB = 1024**3
COLORS = dict(zip(CATEGORIES, ("#4e79a7", "#a0cbe8", "#f28e2b", "#ffbe7d", "#59a14f", "#8cd17d", "#b6992d",
                               "#e15759", "#bab0ac", "#d37295")))
DIRECTION_COLORS = {"reload": "#1b7837", "offload": "#762a83", "stream": "#e08214", "all_gather": "#2166ac",
                    "reduce_scatter": "#b2182b"}
WHEN_OFFSET = {"before": 0.0, "during": 1 / 3, "after": 2 / 3}  # where in a step's column a transfer is drawn
AXIS, TOP, STEP_WIDTH, CHART_HEIGHT, RIGHT_MARGIN = 80, 24, 72, 300, 130
LANE_HEIGHT, CHAR_WIDTH = 16, 6.5  # CHAR_WIDTH: a generous width of one 10-11 px sans-serif character
NAME_COLUMN, ROW_HEIGHT = 270, 18


def _rect(x, y, width, height, fill, tooltip, buffer=None, extra="") -> str:
    data = f' data-buffer="{escape(buffer)}"' if buffer else ""
    return (f'<rect x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" height="{height:.1f}" fill="{fill}"{data}{extra}>'
            f"<title>{escape(tooltip)}</title></rect>")


def _tick_step(top_gib: float) -> float:
    """A round GiB step (1, 2 or 5 x 10^k) giving at most 8 ticks."""
    step = 10 ** -3
    while True:
        for factor in (1, 2, 5):
            if top_gib / (step * factor) <= 8:
                return step * factor
        step *= 10


def transfer_tooltip(transfer) -> str:
    return (f"{transfer.direction} {transfer.buffer} {transfer.when} {transfer.step}: "
            f"{transfer.bytes / 1e9:.3f} GB per training step, {transfer.seconds * 1e3:.1f} ms")


def memory_chart(plan: Plan, live: list[tuple[str, ...]], measured: dict[str, float] | None = None) -> str:
    measured = measured or {}
    top = max(plan.peak_bytes, plan.budget_bytes, *(gib * GIB for gib in measured.values())) * 1.08 or 1
    scale = CHART_HEIGHT / top
    base_y, left = TOP + CHART_HEIGHT, AXIS + 10
    right = left + STEP_WIDTH * len(plan.steps)
    names_height = CHAR_WIDTH * max(len(f"{len(plan.steps)} {step.name}") for step in plan.steps) + 10
    height = base_y + LANE_HEIGHT + 12 + names_height
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" id="memory-chart" width="{right + RIGHT_MARGIN}" '
             f'height="{height:.0f}" font-family="sans-serif">']
    tick = _tick_step(top / GIB)
    for index in range(int(top / GIB / tick) + 1):
        y = base_y - index * tick * GIB * scale
        parts.append(f'<line x1="{left}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                     f'<text x="{AXIS - 4}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{index * tick:g}</text>')
    parts.append(f'<text x="14" y="{TOP + CHART_HEIGHT / 2:.0f}" font-size="11" text-anchor="middle" '
                 f'transform="rotate(-90 14 {TOP + CHART_HEIGHT / 2:.0f})">live device memory (GiB)</text>'
                 f'<line x1="{left}" x2="{left}" y1="{TOP}" y2="{base_y}" stroke="#444"/>'
                 f'<line x1="{left}" x2="{right}" y1="{base_y}" y2="{base_y}" stroke="#444"/>')
    for index, step in enumerate(plan.steps):
        x, top_y = left + index * STEP_WIDTH + 8, base_y
        by_category = {}
        for name in live[index]:
            by_category.setdefault(plan.buffers[name].category, []).append(name)
        for category in CATEGORIES:
            for name in sorted(by_category.get(category, []), key=lambda name: -plan.buffers[name].bytes):
                size = plan.buffers[name].bytes * scale
                if size <= 0:
                    continue
                top_y -= size
                tooltip = f"{step.name}: {name} ({category}) {plan.buffers[name].bytes / GIB:.3f} GiB"
                parts.append(_rect(x, top_y, STEP_WIDTH - 16, size, COLORS[category], tooltip, name,
                                   ' stroke="#fff" stroke-width="0.3"'))
        if step.name == plan.peak.step:
            parts.append(f'<text x="{x + (STEP_WIDTH - 16) / 2:.1f}" y="{top_y - 5:.1f}" font-size="11" '
                         f'text-anchor="middle" font-weight="bold">peak {step.live_bytes / GIB:.2f}</text>')
        if step.name in measured:
            y = base_y - measured[step.name] * GIB * scale
            parts.append(f'<line x1="{x - 5}" x2="{x + STEP_WIDTH - 11}" y1="{y:.1f}" y2="{y:.1f}" stroke="#000" '
                         f'stroke-width="3" class="measured"><title>{escape(step.name)}: measured peak '
                         f"{measured[step.name]:.2f} GiB (predicted {step.live_bytes / GIB:.2f})</title></line>")
        transfers = [transfer for transfer in plan.transfers if transfer.step == step.name]
        for number, transfer in enumerate(transfers):
            width = (STEP_WIDTH - 4) / 3
            tx = left + index * STEP_WIDTH + 2 + WHEN_OFFSET[transfer.when] * (STEP_WIDTH - 4)
            lane = LANE_HEIGHT / len(transfers)
            parts.append(_rect(tx, base_y + 4 + number * lane, width, lane - 1,
                               DIRECTION_COLORS[transfer.direction], transfer_tooltip(transfer), transfer.buffer,
                               ' class="transfer"'))
        label_x, label_y = left + (index + 0.5) * STEP_WIDTH - 4, base_y + LANE_HEIGHT + 10
        parts.append(f'<text x="{label_x:.1f}" y="{label_y}" font-size="10" '
                     f'transform="rotate(90 {label_x:.1f} {label_y})">{index} {escape(step.name)}</text>')
    parts.append(f'<text x="{AXIS - 4}" y="{base_y + 4 + LANE_HEIGHT - 4}" font-size="10" text-anchor="end" '
                 f'fill="#555">transfers</text>')
    budget_y = base_y - plan.budget_bytes * scale
    parts.append(f'<line x1="{left}" x2="{right + 6}" y1="{budget_y:.1f}" y2="{budget_y:.1f}" stroke="#c00" '
                 f'stroke-width="1.5" stroke-dasharray="6 4"><title>budget {plan.budget_bytes / GIB:.2f} GiB'
                 f"</title></line>"
                 f'<text x="{right + 10}" y="{budget_y + 4:.1f}" font-size="11" fill="#c00">budget '
                 f"{plan.budget_bytes / GIB:.2f} GiB</text>")
    return "".join(parts) + "</svg>"


def lifetime_chart(plan: Plan, live: list[tuple[str, ...]]) -> str:
    def first_live(name):
        return next((index for index, names in enumerate(live) if name in names), len(plan.steps))
    names = sorted(plan.buffers, key=lambda name: (plan.buffers[name].lifetime != "held", first_live(name), name))
    step_index = {step.name: index for index, step in enumerate(plan.steps)}
    width = NAME_COLUMN + STEP_WIDTH * len(plan.steps) + 20
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" id="lifetime-chart" width="{width}" '
             f'height="{TOP + ROW_HEIGHT * len(names) + 10}" font-family="sans-serif">']
    parts.append(f'<text x="6" y="{TOP - 8}" font-size="10" fill="#555">buffer</text>'
                 f'<text x="{NAME_COLUMN - 8}" y="{TOP - 8}" font-size="10" fill="#555" text-anchor="end">GiB</text>')
    for index, step in enumerate(plan.steps):
        parts.append(f'<text x="{NAME_COLUMN + (index + 0.5) * STEP_WIDTH:.1f}" y="{TOP - 8}" font-size="10" '
                     f'text-anchor="middle">{index}<title>{escape(step.name)}</title></text>')
    for row, name in enumerate(names):
        buffer = plan.buffers[name]
        y = TOP + row * ROW_HEIGHT
        where = " (host)" if buffer.device == "host" else ""
        parts.append(f'<text x="6" y="{y + 13}" font-size="11" data-buffer="{escape(name)}">{escape(name)}{where}'
                     f'</text><text x="{NAME_COLUMN - 8}" y="{y + 13}" font-size="11" text-anchor="end">'
                     f"{buffer.bytes / GIB:.2f}</text>")
        for index, step in enumerate(plan.steps):
            if name in live[index]:
                tooltip = (f"{name} ({buffer.category}, {buffer.lifetime}) {buffer.bytes / GIB:.3f} GiB at "
                           f"{step.name}; {buffer.formula}; sized by {', '.join(buffer.sized_by)}")
                parts.append(_rect(NAME_COLUMN + index * STEP_WIDTH, y + 3, STEP_WIDTH - 1, ROW_HEIGHT - 6,
                                   COLORS[buffer.category], tooltip, name))
        for transfer in plan.transfers:
            if transfer.buffer == name and transfer.step in step_index:
                x = NAME_COLUMN + (step_index[transfer.step] + WHEN_OFFSET[transfer.when]) * STEP_WIDTH
                parts.append(_rect(x + 2, y + 1, STEP_WIDTH / 3 - 4, ROW_HEIGHT - 2, "none",
                                   transfer_tooltip(transfer), name,
                                   f' stroke="{DIRECTION_COLORS[transfer.direction]}" stroke-width="2.5" '
                                   f'class="transfer"'))
    return "".join(parts) + "</svg>"

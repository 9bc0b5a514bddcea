"""`opdgraph plan --format html`: one self-contained HTML page (inline SVG, CSS and a small script; no network, no
external file), readable in any browser and printable.

From the top: the summary line; the legend (HTML, so it never collides with the charts); the memory chart and the
lifetime chart (opdgraph.render.html_charts); pointing at any buffer shows its details (size, formula, sized by,
where it is allocated and released, its transfers) in a floating box; then the host transfers, the
predicted-vs-measured table of a recorded run (`--measured RUN_DIR`, opdgraph.render.measured), the steps and the
buffers as tables. Without the script the same details are the shapes' <title> tooltips.
"""

from __future__ import annotations

import json
from html import escape

from opdgraph.plan import CATEGORIES, Plan
from opdgraph.render.html_charts import COLORS, DIRECTION_COLORS, GIB, lifetime_chart, memory_chart, transfer_tooltip

STYLE = """body{font-family:sans-serif;margin:20px;color:#222}
table{border-collapse:collapse;margin-bottom:16px}td,th{padding:2px 10px;text-align:right;vertical-align:top}
th{border-bottom:1px solid #888}td.text,th.text{text-align:left}td.formula{text-align:left;max-width:420px}
.legend{display:flex;flex-wrap:wrap;gap:6px 18px;margin:6px 0 10px;font-size:12px;max-width:900px}
.legend span{display:inline-flex;align-items:center;gap:5px}
.swatch{display:inline-block;width:12px;height:12px}
#tip{position:absolute;display:none;background:#fffff4;border:1px solid #999;padding:6px 8px;font-size:12px;
max-width:460px;box-shadow:2px 2px 6px rgba(0,0,0,.25);pointer-events:none}
#tip b{display:block;margin-bottom:3px}[data-buffer]{cursor:pointer}"""

# Hover details: fills #tip from the buffer-details JSON; removes the <title> fallbacks so the browser's own tooltip
# does not cover the box. Written without '<' or '&' so the page stays well-formed XML.
SCRIPT = """document.addEventListener("DOMContentLoaded", function () {
  var details = JSON.parse(document.getElementById("buffer-details").textContent);
  var tip = document.getElementById("tip");
  function show(event, name) {
    var info = details[name];
    tip.textContent = "";
    var title = document.createElement("b");
    title.textContent = name;
    tip.appendChild(title);
    info.lines.forEach(function (line) {
      var div = document.createElement("div");
      div.textContent = line;
      tip.appendChild(div);
    });
    tip.style.display = "block";
    tip.style.left = (event.pageX + 14) + "px";
    tip.style.top = (event.pageY + 14) + "px";
  }
  document.querySelectorAll("[data-buffer]").forEach(function (shape) {
    var name = shape.getAttribute("data-buffer");
    var fallback = shape.querySelector("title");
    if (fallback) { shape.removeChild(fallback); }
    shape.addEventListener("mousemove", function (event) { show(event, name); });
    shape.addEventListener("mouseleave", function () { tip.style.display = "none"; });
  });
});"""


def buffer_details(plan: Plan) -> dict[str, dict]:
    """Per buffer: what the hover box and the buffer table show."""
    allocated, released = {}, {}
    for index, step in enumerate(plan.steps):
        for name in step.allocates:
            allocated.setdefault(name, []).append(f"before {index} {step.name}")
        for name in step.reloads:
            allocated.setdefault(name, []).append(f"before {index} {step.name} (reloaded from host)")
        for release in step.releases:
            verb = "freed" if release.action == "free" else "offloaded to host"
            released.setdefault(release.buffer, []).append(f"after {index} {step.name} ({verb})")
    details = {}
    for name, buffer in plan.buffers.items():
        held = buffer.lifetime == "held" and not buffer.offload_when_idle
        where = "in host memory (streamed through the steps that use it)" if buffer.device == "host" else None
        start = where or ("; ".join(allocated.get(name, [])) or ("at start, held" if held else "never"))
        end = "-" if where else ("; ".join(released.get(name, [])) or ("never (held)" if held else "never"))
        transfers = [transfer_tooltip(transfer) for transfer in plan.transfers if transfer.buffer == name]
        details[name] = {"allocated": start, "released": end, "lines": [
            f"size: {buffer.bytes / GIB:.3f} GiB ({buffer.bytes:,} bytes)",
            f"category: {buffer.category}; lifetime: {buffer.lifetime}"
            + ("; offloaded when idle" if buffer.offload_when_idle else ""),
            f"formula: {buffer.formula or 'n/a'}", f"sized by: {', '.join(buffer.sized_by) or 'n/a'}",
            f"allocated: {start}", f"released: {end}", *(f"transfer: {line}" for line in transfers)]}
    return details


def _legend(plan: Plan, measured: bool) -> str:
    items = [f'<span><i class="swatch" style="background:{COLORS[category]}"></i>{category}</span>'
             for category in CATEGORIES]
    directions = sorted({transfer.direction for transfer in plan.transfers})
    items += [f'<span><i class="swatch" style="background:{DIRECTION_COLORS[direction]}"></i>{direction} '
              f"(transfer)</span>" for direction in directions]
    items.append('<span><i class="swatch" style="border-top:2px dashed #c00;height:0"></i>memory budget</span>')
    if measured:
        items.append('<span><i class="swatch" style="border-top:3px solid #000;height:0"></i>measured peak</span>')
    return f'<div class="legend">{"".join(items)}</div>'


def _table(header: list[str], rows: list[list[str]], text_columns: set[int], table_id: str) -> str:
    def cell(tag, index, value):
        kind = ' class="text"' if index in text_columns else ""
        kind = ' class="formula"' if value.startswith("\0") or value == "formula" else kind
        return f"<{tag}{kind}>{escape(value.lstrip(chr(0)))}</{tag}>"
    head = "".join(cell("th", index, value) for index, value in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", index, value) for index, value in enumerate(row)) + "</tr>"
                   for row in rows)
    return f'<table id="{table_id}"><tr>{head}</tr>{body}</table>'


def _measured_table(plan: Plan, rows: list[dict]) -> str:
    predicted = {step.name: step.live_bytes / GIB for step in plan.steps}
    lines = []
    for row in rows:
        measured = row.get("measured_gib")
        now = predicted.get(row["step"])
        ratio = f"{now / measured:.2f}" if now is not None and measured else "-"
        lines.append([row["step"], "not a step of this plan" if now is None else f"{now:.2f}",
                      f"{row['predicted_gib']:.2f}", "-" if measured is None else f"{measured:.2f}", ratio])
    note = ("" if any(row.get("measured_gib") is not None for row in rows)
            else "<p>Nothing was measured in this run (memory is recorded on CUDA devices only).</p>")
    return ("<h2>Predicted vs measured</h2>" + note +
            _table(["step", "predicted GiB (this plan)", "predicted GiB (at the run)", "measured peak GiB",
                    "predicted / measured"], lines, {0}, "measured"))


def render_html(plan: Plan, measured: list[dict] | None = None) -> str:
    live = plan.live_buffers()
    details = buffer_details(plan)
    mode = "fused training loop" if plan.fused else "unfused"
    measured_peaks = {row["step"]: row["measured_gib"] for row in measured or []
                      if row.get("measured_gib") is not None and row["step"] in {step.name for step in plan.steps}}
    steps = _table(["#", "step", "scope", "runs", "live GiB", "roofline ms"],
                   [[str(index), step.name, step.scope, str(step.repeats), f"{step.live_bytes / GIB:.2f}",
                     f"{step.work.seconds * 1e3:.3f}"] for index, step in enumerate(plan.steps)], {1, 2}, "steps")
    buffers = _table(["buffer", "category", "GiB", "lifetime", "allocated", "released", "formula", "sized by"],
                     [[name, buffer.category, f"{buffer.bytes / GIB:.3f}", buffer.lifetime,
                       details[name]["allocated"], details[name]["released"], "\0" + (buffer.formula or "n/a"),
                       ", ".join(buffer.sized_by)] for name, buffer in plan.buffers.items()],
                     {0, 1, 3, 4, 5, 7}, "buffers")
    transfers = ("<h2>Host transfers and exchanges</h2>" + _table(
        ["step", "when", "buffer", "direction", "GB per training step", "ms"],
        [[transfer.step, transfer.when, transfer.buffer, transfer.direction, f"{transfer.bytes / 1e9:.3f}",
          f"{transfer.seconds * 1e3:.1f}"] for transfer in plan.transfers], {0, 1, 2, 3}, "transfers")
        if plan.transfers else "")
    data = json.dumps(details, sort_keys=True).replace("<", "\\u003c").replace("&", "\\u0026")
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"/><title>opdgraph plan: {escape(plan.name)}</title>
<style>{STYLE}</style>
<script type="application/json" id="buffer-details">{data}</script>
<script>{SCRIPT}</script></head><body>
<h1>opdgraph plan: {escape(plan.name)}</h1>
<p>{mode}; peak {plan.peak_bytes / GIB:.2f} GiB at <b>{escape(plan.peak.step)}</b>; budget
{plan.budget_bytes / GIB:.2f} GiB; roofline time per training step {plan.step_seconds:.3f} s.
Point at a buffer for its details.</p>
<h2>Live device memory by category</h2>
{_legend(plan, bool(measured_peaks))}
{memory_chart(plan, live, measured_peaks)}
<h2>Buffer lifetimes</h2>
{lifetime_chart(plan, live)}
{transfers}{_measured_table(plan, measured) if measured is not None else ""}
<h2>Steps</h2>
{steps}
<h2>Buffers</h2>
{buffers}
<div id="tip"></div>
</body></html>
"""

"""The plan page in a real headless Chromium (skipped where none is installed, as in CI): no two text boxes overlap
(the budget label once ran into the legend, rotated step names into each other) and the browser requests no
resource, and pointing at a buffer shows its details. A script added to a copy of the page writes the laid-out boxes of every piece of text into the DOM;
`chromium --dump-dom` prints that DOM and the check runs here."""

from __future__ import annotations

import html as html_module
import itertools
import json
import pathlib
import re
import shutil
import subprocess

import pytest

from opdgraph.render import render_html
from plan_page_helpers import fitted_plan

GIB = 2**30
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or (
    "/usr/bin/chromium" if pathlib.Path("/usr/bin/chromium").exists() else None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1000"]
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed")

# Boxes of rendered text: SVG <text> by its element box (rotation included), HTML text by the line boxes of each
# text node. Hidden text (the closed hover box, <title>) has no boxes.
MEASURE = """<script>
document.addEventListener("DOMContentLoaded", function () {  // after the page's own handler: hover is wired
  var boxes = [];
  function keep(label, rect) {
    if (rect.width > 0.5 && rect.height > 0.5) {
      boxes.push({text: label, left: rect.left, top: rect.top, right: rect.right, bottom: rect.bottom});
    }
  }
  document.querySelectorAll("svg text").forEach(function (element) {
    keep(element.textContent, element.getBoundingClientRect());
  });
  var walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  var node = walker.nextNode();
  while (node) {
    var parent = node.parentNode;
    var skip = parent.closest("svg, script, style") || !node.data.trim();
    if (!skip) {
      var range = document.createRange();
      range.selectNodeContents(node);
      Array.prototype.forEach.call(range.getClientRects(), function (rect) { keep(node.data.trim(), rect); });
    }
    node = walker.nextNode();
  }
  var resources = performance.getEntriesByType("resource").map(function (entry) { return entry.name; });
  var shape = document.querySelector("rect[data-buffer]");
  shape.dispatchEvent(new MouseEvent("mousemove", {bubbles: true, clientX: 20, clientY: 20}));
  var tip = document.getElementById("tip");
  var hover = {buffer: shape.getAttribute("data-buffer"), text: tip ? tip.innerText : "",
               titles_left: document.querySelectorAll("[data-buffer] title").length};
  var out = document.createElement("pre");
  out.id = "measured-boxes";
  out.textContent = JSON.stringify({boxes: boxes, resources: resources, hover: hover});
  document.body.appendChild(out);
});
</script>"""


def _render_in_browser(html: str, tmp_path) -> dict:
    page = tmp_path / "page.html"
    page.write_text(html.replace("</body>", MEASURE + "</body>"))
    result = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                             page.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="measured-boxes">(.*?)</pre>', result.stdout, re.S)
    assert found, f"chromium printed no measurements (exit {result.returncode}): {result.stderr[-2000:]}"
    return json.loads(html_module.unescape(found.group(1)))


def _overlaps(boxes: list[dict], tolerance: float = 1.0) -> list[str]:
    found = []
    for first, second in itertools.combinations(boxes, 2):
        width = min(first["right"], second["right"]) - max(first["left"], second["left"])
        height = min(first["bottom"], second["bottom"]) - max(first["top"], second["top"])
        if width > tolerance and height > tolerance:
            found.append(f"{first['text']!r} overlaps {second['text']!r} ({width:.1f} x {height:.1f} px)")
    return found


def _measured_rows(plan):
    return [{"step": step.name, "predicted_gib": step.live_bytes / GIB, "measured_gib": step.live_bytes / GIB * 0.97}
            for step in plan.steps]


@pytest.mark.parametrize("pipeline, overrides, measured", [
    ("qwen3_4b_from_14b.toml", [], True),  # the page of the issue: streams, peak next to the budget line
    ("qwen25_1b5_from_7b.toml", ["models.teacher.offload_when_idle=true"], False),  # reload / offload
])
def test_no_text_overlaps_in_a_real_browser(tmp_path, pipeline, overrides, measured):
    """If this fails, text on the plan page runs into other text when a browser lays it out (labels, legend, axis,
    step names, tables), or the page makes the browser fetch a resource."""
    plan = fitted_plan(pipeline, overrides)
    result = _render_in_browser(render_html(plan, _measured_rows(plan) if measured else None), tmp_path)
    assert result["resources"] == []
    texts = " ".join(box["text"] for box in result["boxes"])
    assert "budget" in texts and "peak" in texts and plan.steps[-1].name in texts  # the measurement saw the page
    assert _overlaps(result["boxes"]) == []
    hover, buffer = result["hover"], plan.buffers[result["hover"]["buffer"]]  # pointing at a buffer shows details
    assert f"formula: {buffer.formula}" in hover["text"] and f"{buffer.bytes:,} bytes" in hover["text"]
    assert hover["titles_left"] == 0  # the <title> fallbacks are gone, so the browser's tooltip does not cover it


def test_the_overlap_check_sees_overlaps(tmp_path):
    """If this fails, the browser test passes vacuously: text drawn on top of other text is not reported."""
    page = ('<!DOCTYPE html><html><body><svg width="300" height="100"><text x="10" y="40">budget 72.00 GiB</text>'
            '<text x="30" y="44">weights</text><rect data-buffer="x" width="5" height="5"/></svg><p>fine</p>'
            "</body></html>")
    overlaps = _overlaps(_render_in_browser(page, tmp_path)["boxes"])
    assert len(overlaps) == 1 and "budget" in overlaps[0] and "weights" in overlaps[0]

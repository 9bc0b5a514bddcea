"""Plan renderers: `text` (terminal chart), `json` (stable, for goldens and diffs), `html` (one self-contained page
with inline SVG) and `torch-snapshot` (the predicted schedule as a PyTorch memory snapshot, bytes). Each is a pure
function Plan -> str (or bytes); the output is deterministic."""

from opdgraph.render.html import render_html
from opdgraph.render.json_format import render_json
from opdgraph.render.text import render_text
from opdgraph.render.torch_snapshot import render_torch_snapshot

RENDERERS = {"text": render_text, "json": render_json, "html": render_html, "torch-snapshot": render_torch_snapshot}

__all__ = ["RENDERERS", "render_html", "render_json", "render_text", "render_torch_snapshot"]

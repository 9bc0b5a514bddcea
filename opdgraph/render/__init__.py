"""Plan renderers: `text` (terminal chart), `json` (stable, for goldens and diffs) and `html` (one self-contained
file with inline SVG). Each is a pure function Plan -> str; the output is deterministic."""

from opdgraph.render.html import render_html
from opdgraph.render.json_format import render_json
from opdgraph.render.text import render_text

RENDERERS = {"text": render_text, "json": render_json, "html": render_html}

__all__ = ["RENDERERS", "render_html", "render_json", "render_text"]

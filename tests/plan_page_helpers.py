"""Helpers of the plan-page tests: compile a shipped pipeline, find the external references of an HTML page."""

from __future__ import annotations

import pathlib
import re
from html.parser import HTMLParser

from opdgraph.config import load_pipeline
from opdgraph.fit import fit_plan

PIPELINES = pathlib.Path(__file__).parent.parent / "pipelines"
REMOTE = re.compile(r"^\s*(https?:)?//", re.IGNORECASE)
CSS_URL = re.compile(r"url\(\s*['\"]?([^'\")]*)", re.IGNORECASE)


def fitted_plan(pipeline: str, overrides=()):
    """The plan `opdgraph plan` renders: the configured one, or the fit search's choice."""
    return fit_plan(load_pipeline(str(PIPELINES / pipeline), list(overrides))).plan


class _References(HTMLParser):
    def __init__(self):
        super().__init__()
        self.found, self.in_style = [], False

    def handle_starttag(self, tag, attrs):
        self.in_style = tag == "style"
        if tag == "link" or (tag == "script" and dict(attrs).get("src")):
            self.found.append(f"<{tag}> {attrs}")
        for name, value in attrs:
            value = value or ""
            if name in ("src", "href", "xlink:href", "action", "srcset", "poster", "data") and REMOTE.match(value):
                self.found.append(f"{tag} {name}={value}")
            if name == "style":
                self.found += [f"{tag} style url({url})" for url in CSS_URL.findall(value)]

    def handle_endtag(self, tag):
        self.in_style = False

    def handle_data(self, data):
        if self.in_style:
            self.found += [f"<style> url({url})" for url in CSS_URL.findall(data)]
            self.found += ["<style> @import"] if "@import" in data else []


def external_references(html: str) -> list[str]:
    """Every src/href/url()/@import/<link> of the page that would load something: none is allowed (the page must
    open offline, from a file or an attachment)."""
    parser = _References()
    parser.feed(html)
    return parser.found

"""`opdgraph plan --format json`: the whole Plan as JSON with sorted keys, integers for FLOPs and bytes, and
seconds rounded to nanoseconds, so golden files and diffs stay stable across machines. The fit search's fields
(`transfers`, `fit`) appear only when it ran or the plan moves data (offloads, streams, the exchanges of several
ranks), and a buffer's `spans_loops` only when true, so one-process plans that fit as configured keep their JSON."""

from __future__ import annotations

import json

import attrs

from opdgraph.plan import Plan


def _stable(value):
    if isinstance(value, float):
        return round(value, 9) if abs(value) < 1e6 else int(round(value))
    if isinstance(value, dict):
        return {str(key): _stable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_stable(item) for item in value]
    return value


def plan_to_dict(plan: Plan) -> dict:
    data = attrs.asdict(plan, recurse=True)
    data["peak_bytes"] = plan.peak_bytes
    data["over_budget"] = plan.over_budget
    for key in ("transfers", "fit"):
        if not data[key]:
            del data[key]
    for buffer in data["buffers"].values():
        if not buffer["spans_loops"]:
            del buffer["spans_loops"]
    return _stable(data)


def render_json(plan: Plan) -> str:
    return json.dumps(plan_to_dict(plan), indent=1, sort_keys=True) + "\n"

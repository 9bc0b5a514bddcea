"""`opdgraph plan --format torch-snapshot --out plan.pickle`: the predicted memory schedule of one training step as a
PyTorch memory snapshot (the dict `torch.cuda.memory._snapshot()` returns and `_dump_snapshot` pickles), so
https://pytorch.org/memory_viz shows the prediction in the same viewer as a snapshot recorded by
`opdgraph run --record-memory`, and the two can be compared side by side.

Torch-free: plain dicts, pickled. Each device buffer gets its own address range (the plan has no address layout, so
the timeline is exact and the address view is not). The trace replays the plan: held buffers are allocated first,
then per step the buffers it allocates or reloads are allocated before it and those it releases (free or offload to
host) are freed after it. Every event's frames name the plan step and the buffer, which is what the viewer shows
when a block is pointed at. Host-resident buffers never appear: they use no device memory.
"""

from __future__ import annotations

import pickle

from opdgraph.plan import Plan

BASE_ADDRESS = 0x7F0000000000  # any aligned value: the viewer only needs distinct, non-overlapping ranges
ALIGN = 512  # the caching allocator's block alignment
STEP_MICROSECONDS = 1000  # one plan step per millisecond on the viewer's time axis


def _addresses(plan: Plan) -> dict[str, int]:
    addresses, address = {}, BASE_ADDRESS
    for name, buffer in plan.buffers.items():
        if buffer.device == "device" and buffer.bytes > 0:
            addresses[name] = address
            address += -(-buffer.bytes // ALIGN) * ALIGN
    return addresses


def _frames(plan: Plan, name: str, where: str) -> list[dict]:
    buffer = plan.buffers[name]
    return [{"name": f"{name} ({buffer.category}, {buffer.lifetime}) = {buffer.formula or 'n/a'}",
             "filename": f"opdgraph plan {plan.name}: {where}", "line": 0}]


def _event(action: str, address: int, size: int, frames: list[dict], time_us: int, category: str) -> dict:
    # category: the viewer colors the timeline by it (as for profiler-made snapshots), like the plan page's bars
    return {"action": action, "addr": address, "size": size, "stream": 0, "frames": frames, "time_us": time_us,
            "category": category}


def snapshot_dict(plan: Plan) -> dict:
    """The snapshot as plain dicts: one device (0), one segment holding every device buffer's address range."""
    addresses = _addresses(plan)
    trace, live, time_us = [], set(), 0

    def alloc(name: str, where: str) -> None:
        if name in addresses:
            trace.append(_event("alloc", addresses[name], plan.buffers[name].bytes, _frames(plan, name, where),
                                time_us, plan.buffers[name].category))
            live.add(name)

    def free(name: str, where: str) -> None:
        if name in addresses:
            for action in ("free_requested", "free_completed"):
                trace.append(_event(action, addresses[name], plan.buffers[name].bytes, _frames(plan, name, where),
                                    time_us, plan.buffers[name].category))
            live.discard(name)

    for name, buffer in plan.buffers.items():
        if buffer.lifetime == "held" and not buffer.offload_when_idle:
            alloc(name, "held for the whole run")
    for index, step in enumerate(plan.steps):
        time_us = (index + 1) * STEP_MICROSECONDS
        for name in step.allocates:
            alloc(name, f"step {index} {step.name} (allocated before it)")
        for name in step.reloads:
            alloc(name, f"step {index} {step.name} (reloaded from host before it)")
        time_us += STEP_MICROSECONDS // 2
        for release in step.releases:
            verb = "freed" if release.action == "free" else "offloaded to host"
            free(release.buffer, f"step {index} {step.name} ({verb} after it)")
    return {"segments": [_segment(plan, addresses, live)], "device_traces": [trace],
            "allocator_settings": {"PYTORCH_CUDA_ALLOC_CONF": "opdgraph plan prediction"}}


def _segment(plan: Plan, addresses: dict[str, int], live: set[str]) -> dict:
    """The allocator's state after the trace: blocks in address order, the still-live buffers active."""
    blocks, total = [], 0
    for name, address in addresses.items():
        size = -(-plan.buffers[name].bytes // ALIGN) * ALIGN
        block = {"address": address, "size": size, "requested_size": plan.buffers[name].bytes,
                 "state": "active_allocated" if name in live else "inactive",
                 "frames": _frames(plan, name, "live at the end of the step") if name in live else []}
        blocks.append(block)
        total += size
    active = sum(block["size"] for block in blocks if block["state"] == "active_allocated")
    requested = sum(block["requested_size"] for block in blocks if block["state"] == "active_allocated")
    return {"device": 0, "address": BASE_ADDRESS, "total_size": total, "allocated_size": active,
            "active_size": active, "requested_size": requested, "stream": 0, "segment_type": "large",
            "segment_pool_id": (0, 0), "is_expandable": False, "frames": [], "blocks": blocks}


def render_torch_snapshot(plan: Plan) -> bytes:
    return pickle.dumps(snapshot_dict(plan), protocol=4)

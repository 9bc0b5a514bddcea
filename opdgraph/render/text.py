"""`opdgraph plan` text output: the step table with roofline times, the peak and what makes it, and a lifetime chart
(buffers x steps) with a live-memory row, the peak marked, and the step after which each buffer is released.
Plans chosen by the fit search also start with what it chose and list their host transfers (PCIe bytes and time);
plans of pipelines with linear-attention layers say which core they size (planned_paths.linear_core)."""

from __future__ import annotations

from opdgraph.plan import Plan
from opdgraph.planned_paths import LINEAR_CORE_ENVIRONMENT
from opdgraph.stages import stage_module

GIB = 1024**3
LEGEND = ("Legend: A allocated before the step  # live  F freed after  X allocated and freed in the step  "
          "= held (never freed)\n        L reloaded from host before  O offloaded to host after  . not on the device\n"
          "        live row: live memory in tenths of the peak (* = the peak step)")


def gib(size: float) -> str:
    return f"{size / GIB:.2f}"


def _seconds(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.3f} s"


def _step_table(plan: Plan) -> list[str]:
    lines = [f"  {'#':>2}  {'step':<26} {'scope':<12} {'runs':>6} {'live GiB':>9}  {'roofline':>11}  "
             f"{'TFLOP':>9}  {'GB moved':>9}"]
    for index, step in enumerate(plan.steps):
        periodic = "  (periodic)" if getattr(stage_module(step.kind), "PERIODIC", False) else ""
        lines.append(f"  {index:>2}  {step.name:<26} {step.scope:<12} {step.repeats:>6} {gib(step.live_bytes):>9}  "
                     f"{_seconds(step.work.seconds):>11}  {step.work.flops / 1e12:>9.3f}  "
                     f"{(step.work.device_bytes + step.work.pcie_bytes) / 1e9:>9.3f}{periodic}")
    return lines


def _peak_lines(plan: Plan) -> list[str]:
    verdict = "OVER BUDGET" if plan.over_budget else "within budget"
    lines = [f"Peak {gib(plan.peak_bytes)} GiB at step '{plan.peak.step}' "
             f"(budget {gib(plan.budget_bytes)} GiB: {verdict}). Largest buffers there:"]
    for name, size in plan.peak.contributors[:6]:
        buffer = plan.buffers[name]
        lines.append(f"  {name:<26} {gib(size):>8} GiB  {buffer.category:<16} = {buffer.formula or 'n/a'};  "
                     f"sized by {', '.join(buffer.sized_by)}")
    return lines


def _cell(name: str, index: int, plan: Plan, live: list[tuple[str, ...]]) -> str:
    buffer = plan.buffers[name]
    if buffer.device == "host":
        return "H"
    if buffer.lifetime == "held" and not buffer.offload_when_idle:
        return "="
    if name not in live[index]:
        return "."
    step = plan.steps[index]
    starts = name in step.allocates or name in step.reloads
    release = next((release.action for release in step.releases if release.buffer == name), None)
    if starts and release == "free":
        return "X"
    if name in step.reloads:
        return "L"
    if starts:
        return "A"
    return {"free": "F", "offload": "O"}.get(release, "#")


def _chart(plan: Plan) -> list[str]:
    live = plan.live_buffers()
    steps = range(len(plan.steps))

    def first_live(name):
        return next((index for index in steps if name in live[index]), len(plan.steps))
    names = sorted(plan.buffers, key=lambda name: (plan.buffers[name].lifetime != "held", first_live(name), name))
    released_after = {release.buffer: step.name for step in plan.steps for release in step.releases}
    width = max(26, *(len(name) for name in names))  # composed pipelines' buffer names can be longer
    header = f"  {'buffer':<{width}} {'GiB':>8}  " + "".join(f"{index:>3}" for index in steps) + "   released after"
    lines = [header]
    for name in names:
        cells = "".join(f"{_cell(name, index, plan, live):>3}" for index in steps)
        after = released_after.get(name, "never (held)" if plan.buffers[name].lifetime == "held" else "-")
        lines.append(f"  {name:<{width}} {gib(plan.buffers[name].bytes):>8}  {cells}   {after}")
    peak_index = next(index for index, step in enumerate(plan.steps) if step.name == plan.peak.step)
    tenths = "".join(f"{'*' if index == peak_index else min(9, int(10 * step.live_bytes / max(plan.peak_bytes, 1))):>3}"
                     for index, step in enumerate(plan.steps))
    lines.append(f"  {'live memory (tenths of peak)':<{width + 9}}  {tenths}")
    return lines


def _fit_lines(plan: Plan) -> list[str]:
    """What the fit search (opdgraph.fit) chose, when it ran."""
    fit = plan.fit
    if not fit:
        return []
    verb = "chose" if fit["fits"] else "nothing fits; closest"
    line = f"fit: {verb} {fit['described']}: predicted {fit['step_seconds']:.3f} s/step"
    if "no_offload_step_seconds" in fit:
        line += (f" (vs {fit['no_offload_step_seconds']:.3f} s/step without offload, which needs "
                 f"{gib(fit['no_offload_peak_bytes'])} GiB; the smallest plan without offload needs "
                 f"{gib(fit['no_offload_min_peak_bytes'])} GiB)")
    return [line, f"     {fit['fitting']} of {fit['candidates']} candidates fit {gib(plan.budget_bytes)} GiB; "
                  f"this one peaks at {gib(fit['peak_bytes'])} GiB", ""]


def _transfer_lines(plan: Plan) -> list[str]:
    """Host transfers of the placement the plan uses (offloads, reloads, streams): bytes over PCIe and their time."""
    if not plan.transfers:
        return []
    gathers = any(transfer.direction == "all_gather" for transfer in plan.transfers)
    lines = ["Transfers (host copies over PCIe, FSDP exchanges over the GPU interconnect; bytes received per rank "
             "and time per training step):" if gathers else "Host transfers (PCIe; bytes and time per training step):"]
    width = max(8, *(len(transfer.direction) for transfer in plan.transfers))
    for transfer in plan.transfers:
        note = "  (never written: the host copy is current, the device copy is dropped)" if not transfer.bytes else ""
        lines.append(f"  {transfer.when + ' ' + transfer.step:<28} {transfer.direction:<{width}} {transfer.buffer:<26} "
                     f"{gib(transfer.bytes):>8} GiB  {_seconds(transfer.seconds):>11}{note}")
    total = sum(transfer.seconds for transfer in plan.transfers)
    kind = "transfer" if gathers else "PCIe"
    return [*lines, f"  total {kind} time {_seconds(total)} (included in the step times above; a stream "
                    f"{'or an FSDP exchange in the training loop ' if gathers else ''}overlaps its step's compute"
                    f"{', the all-gather before rollout does not' if gathers else ''})", ""]


def render_text(plan: Plan) -> str:
    mode = "fused training loop" if plan.fused else "unfused: stage by stage"
    facts = plan.facts
    legend = LEGEND + ("\n        H in host memory, streamed through the step that uses it"
                       if any(buffer.device == "host" for buffer in plan.buffers.values()) else "")
    out = [*_fit_lines(plan),
           f"opdgraph plan: {plan.name}  ({mode}; memory budget {gib(plan.budget_bytes)} GiB)",
           f"  rollout: {facts['rollout.sequences']} sequences, {facts['rollout.concurrent_seqs']} at a time, "
           f"KV pool {facts['rollout.num_pages']} pages x {facts['rollout.page_size']} tokens",
           f"  training: {facts['train.tokens_per_step']} tokens/step in "
           f"{facts['train.num_micro_batches']} micro-batches "
           f"of {facts['train.micro_batch_tokens']} tokens, {facts['loss.chunks_per_micro_batch']} loss chunks of "
           f"{facts['loss.chunk_tokens']} tokens each",
           *([f"  ranks: {facts['world_size']} (data parallel, FSDP2-sharded student gathered per "
               f"{'step' if any(n.endswith('.unsharded_grads') for n in plan.buffers) else 'layer'}, "
               f"{'sharded' if any(n.endswith('.gathered_root') for n in plan.buffers) else 'replicated'} teacher; "
               "every size here is per rank)"]
             if "world_size" in facts else []),
           *([f"  linear attention: {facts['linear_attention_core']} core (chosen by pipeline.device and "
               f"{LINEAR_CORE_ENVIRONMENT}; the run selects the same)"] if "linear_attention_core" in facts else []),
           "",
           "Steps (in execution order; runs = per training step):", *_step_table(plan), "",
           f"Roofline time of one training step: {_seconds(plan.step_seconds)} (periodic steps not included)", "",
           *_transfer_lines(plan), *_peak_lines(plan), "",
           "Buffer lifetimes:", *_chart(plan), "", legend]
    return "\n".join(out) + "\n"

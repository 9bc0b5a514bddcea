"""The data source: the step that hands the training step its prompts (configured by `[data]`, not a stage table).

It is the stage graph's source node (opdgraph.graph.DATA_NODE): planned and run like a stage kind, with one step
(`data.load`) that writes `prompts`, the next `data.prompts_per_step` prompt rows of the sampler (opdgraph.data).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opdgraph import sizing
from opdgraph import work as W
from opdgraph.drafts import Draft
from opdgraph.graph import DATA_NODE, DATA_WRITES
from opdgraph.plan import Buffer

if TYPE_CHECKING:  # the compiler's facts and the runtime's inputs; types only, so importing a stage stays light
    from opdgraph.runtime.stage_inputs import StageInputs
    from opdgraph.stage_plan import StageFacts

READS = ()
WRITES = DATA_WRITES


def plan_steps(stage_name: str, config: Any, facts: StageFacts) -> list[Draft]:
    """Loading the prompts has no modelled cost."""
    return [Draft(f"{DATA_NODE}.load", DATA_NODE, DATA_NODE, (), WRITES, (), 1, W.Work())]


def plan_buffers(stage_name: str, config: Any, facts: StageFacts) -> list[Buffer]:
    """`prompts`: the step's prompt token ids."""
    return [Buffer(name="prompts", category="io", bytes=sizing.token_bytes(facts.counts.sequences,
                                                                           facts.counts.prompt_tokens),
                   sized_by=(*facts.batch_keys[:3], *facts.gold_keys), lifetime="transient",
                   formula="sequences x max_prompt_tokens x 4" + (" (the gold prefix's bound included)"
                                                                   if facts.gold_keys else ""))]


def bind(stage_name: str, config: Any, run) -> dict[str, Any]:
    return {"sampler": run.sampler}


def execute(step, config: Any, inputs: StageInputs) -> None:
    inputs.values.put("prompts", inputs.models["sampler"].next_batch())

"""A run says so at its start when the data holds fewer prompts than a step draws (every step then repeats prompts).

A failure means such a run repeats prompts within every step without a word (the user believes each step sees
prompts_per_step distinct prompts).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from opdgraph.compile import compile_plan
from opdgraph.config import load_pipeline
from opdgraph.data import LoadSummary, PromptRecord, PromptSampler, PromptSet
from opdgraph.runtime.build import build_context

TINY = Path(__file__).resolve().parents[1] / "pipelines" / "tiny.toml"


def prompt_set(count: int) -> PromptSet:
    records = tuple(PromptRecord(source="m.jsonl", row=i + 1, location=f"m.jsonl:{i + 1}",
                                 messages=({"role": "user", "content": f"p{i}"},), prompt_ids=(i,))
                    for i in range(count))
    return PromptSet(records=records, summary=LoadSummary(num_loaded=count))


@pytest.mark.parametrize("prompts, per_step, world_size, repeats", [
    (3, 8, 1, True), (8, 8, 1, False), (9, 8, 1, False), (6, 8, 2, True), (8, 8, 2, False),
])
def test_note_exactly_when_a_step_repeats_prompts(prompts, per_step, world_size, repeats):
    """If this fails, the note is missing when a step holds a prompt twice, or shown when it does not."""
    samplers = [PromptSampler(prompt_set(prompts), prompts_per_step=per_step, seed=0, rank=rank,
                              world_size=world_size) for rank in range(world_size)]
    step = [sample.prompt_index for sampler in samplers for sample in sampler.next_batch()]
    assert (len(set(step)) < len(step)) == repeats  # what the sampler really does, across all ranks
    note = samplers[0].repeat_note()
    assert (note is not None) == repeats
    if repeats:
        assert f"holds {prompts} prompt(s)" in note and f"prompts_per_step = {per_step}" in note


def test_run_prints_the_note_at_start(tmp_path, capsys):
    """If this fails, `opdgraph run` on a 3-prompt file with prompts_per_step = 8 starts without the note."""
    data = tmp_path / "three.jsonl"
    data.write_text("".join(f'{{"prompt": "Say {word}."}}\n' for word in ("one", "two", "three")))
    cfg = load_pipeline(TINY, ["pipeline.device=cpu", f'data.train_files=["{data}"]'])
    build_context(cfg, compile_plan(cfg), tmp_path / "run")  # what `run` builds before its first step
    assert "note: the training data holds 3 prompt(s) but every step draws prompts_per_step = 8" in (
        capsys.readouterr().out)

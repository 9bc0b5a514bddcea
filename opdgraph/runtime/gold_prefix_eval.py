"""Eval's accuracy with the gold prefix (hybrid SFT + OPD, stages/sft.py), beside its accuracy without it.

The eval prompts that carry a reference answer and a gold solution are answered once more by the student, each
continuing from its gold prefix at the schedule's first step (the full prefix, as training starts: how far the
prefix carries the student, whatever the schedule has decayed to by now). The answer graded is the prefix's text
followed by the student's continuation. A prompt whose prefix would be its whole gold solution (a fraction of 1.0
on a short solution) is not graded: the answer would be the gold's, not the student's. Reported as
`accuracy_with_gold_prefix` over the graded prompts, with their count (`gold_prefix_graded`), the mean prefix
length (`gold_prefix_length_mean`, tokens) and the mean share of its gold solution the prefix holds
(`gold_prefix_share_mean`), next to eval's `accuracy` (no prefix).
"""

from __future__ import annotations

from typing import Callable

from opdgraph.data.gold_prefix import with_gold_prefix
from opdgraph.runtime.answer_scoring import is_correct

FIRST_STEP = 0  # the schedule's step whose prefix eval places


def accuracy_with_gold_prefix(sft, tokenizer, prompts, generate: Callable[[list], list]) -> dict:
    """{} without an sft stage (`sft`: its Config, or None) or without graded prompts; `generate(prompts)` answers
    them with the student."""
    if sft is None:
        return {}
    schedule = sft.prefix_schedule()
    graded = [prompt for prompt in prompts if prompt.record.answer is not None and prompt.record.gold_ids
              and schedule.tokens(len(prompt.record.gold_ids), FIRST_STEP) < len(prompt.record.gold_ids)]
    if not graded:
        return {}
    samples = generate(with_gold_prefix(graded, schedule, FIRST_STEP))
    decode = tokenizer.decode
    correct = sum(is_correct(decode(sample.prompt_ids[len(sample.prompt_ids) - sample.gold_prefix_length:]
                                    + sample.response_ids), str(sample.answer)) for sample in samples)
    shares = [schedule.tokens(len(p.record.gold_ids), FIRST_STEP) / len(p.record.gold_ids) for p in graded]
    return {"accuracy_with_gold_prefix": correct / len(samples), "gold_prefix_graded": len(samples),
            "gold_prefix_length_mean": sum(sample.gold_prefix_length for sample in samples) / len(samples),
            "gold_prefix_share_mean": sum(shares) / len(shares)}

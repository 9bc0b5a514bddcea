"""Eval's accuracy with the gold prefix (hybrid SFT + OPD, stages/sft.py), beside its accuracy without it.

The eval prompts that carry a reference answer are answered once more by the student, each continuing from its
gold prefix at the schedule's first step (the full prefix, as training starts: how far the prefix carries the
student, whatever the schedule has decayed to by now). The answer graded is the prefix's text followed by the
student's continuation. Reported as `accuracy_with_gold_prefix`, with the mean prefix length
(`gold_prefix_tokens_mean`), next to eval's `accuracy` (no prefix).
"""

from __future__ import annotations

from typing import Callable

from opdgraph.data.gold_prefix import with_gold_prefix
from opdgraph.runtime.answer_scoring import is_correct

FIRST_STEP = 0  # the schedule's step whose prefix eval places


def accuracy_with_gold_prefix(sft, tokenizer, prompts, generate: Callable[[list], list]) -> dict:
    """{} without an sft stage (`sft`: its Config, or None) or without graded prompts; `generate(prompts)` answers
    them with the student."""
    graded = [prompt for prompt in prompts if prompt.record.answer is not None]
    if sft is None or not graded:
        return {}
    samples = generate(with_gold_prefix(graded, sft.prefix_schedule(), FIRST_STEP))
    decode = tokenizer.decode
    correct = sum(is_correct(decode(sample.prompt_ids[len(sample.prompt_ids) - sample.gold_prefix_length:]
                                    + sample.response_ids), str(sample.answer)) for sample in samples)
    return {"accuracy_with_gold_prefix": correct / len(samples),
            "gold_prefix_tokens_mean": sum(sample.gold_prefix_length for sample in samples) / len(samples)}

"""Degeneration check of eval responses: diversity and repetition of token ids, and a warning when they collapse.

A student can lower its KL to the teacher by collapsing onto text the teacher finds easy to predict (the
layer-pruned demo answered every prompt with "The 1000000..."): the KL falls, the text is broken. Eval therefore
reports, for the student's responses and, as the reference, for the teacher's (`teacher_` prefix), computed on
token ids (the EOS that ends a response is dropped first):

- `distinct_1`, `distinct_2`: unique n-grams / total n-grams, counted over all responses together (an n-gram
  never spans two responses). 0.0 when there are no n-grams at all (every response shorter than n).
- `repeat_run_mean`, `repeat_run_max`: per response, the longest run of one n-gram (n = 1..4) repeated back to
  back, in copies: `a b a b a b` is a run of 3 of `a b`, `x x x x` a run of 4 of `x`; 1 for any non-empty
  response without an immediate repeat, 0 for an empty one. Mean and max over responses.
- `identical_share`: the fraction of responses whose token ids equal another response's (0 when all differ, 1
  when every response has a twin; different prompts should get different answers).

`collapse_warnings(now, before)` lists what looks collapsed in the student's responses. Absolute thresholds (any
eval, including the one before training):
- identical_share > 0.5 (most responses are a copy of another one);
- distinct_2 < 0.2 (fluent text of a few dozen tokens per answer is above 0.5);
- repeat_run_mean >= 8 (the average answer repeats one n-gram 8 times in a row).
Relative to the eval before training (`before`, when there is one), which catches a collapse of a student that
started out less diverse than the absolute thresholds assume:
- distinct_2 below half of its value before;
- repeat_run_mean above twice its value before plus 2 (plus 2: a rise from 1 to 3 is still ordinary text);
- identical_share up by more than 0.25 and at least 0.5.
A student that is already degenerate before training (a random tiny model) is reported as such at the first eval;
the thresholds are not tuned to any pipeline. Pure Python, no torch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

MAX_REPEAT_NGRAM = 4
METRIC_KEYS = ("distinct_1", "distinct_2", "repeat_run_mean", "repeat_run_max", "identical_share")


def ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(responses: Sequence[Sequence[int]], n: int) -> float:
    """Unique n-grams / total n-grams over all responses; 0.0 when there is no n-gram."""
    grams = [gram for tokens in responses for gram in ngrams(tokens, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def longest_repeat_run(tokens: Sequence[int], max_n: int = MAX_REPEAT_NGRAM) -> int:
    """The most back-to-back copies of any n-gram, n = 1..max_n (0 for an empty response)."""
    best = 1 if tokens else 0
    for n in range(1, max_n + 1):
        # runs[i]: copies of tokens[i:i+n] starting at i, each n after the previous; filled from the end
        runs = [1] * len(tokens)
        for i in range(len(tokens) - 2 * n, -1, -1):
            if tokens[i:i + n] == tokens[i + n:i + 2 * n]:
                runs[i] = runs[i + n] + 1
                best = max(best, runs[i])
    return best


def identical_share(responses: Sequence[Sequence[int]]) -> float:
    """The fraction of responses equal to at least one other response."""
    if not responses:
        return 0.0
    counts = Counter(tuple(tokens) for tokens in responses)
    return sum(count for count in counts.values() if count > 1) / len(responses)


def response_metrics(responses: Iterable[Sequence[int]], *, end_ids: Iterable[int] = (),
                     prefix: str = "") -> dict[str, float]:
    """The METRIC_KEYS of one model's responses (with `prefix`); a final token in `end_ids` (EOS) is dropped."""
    end = set(end_ids)
    trimmed = [list(tokens[:-1]) if tokens and tokens[-1] in end else list(tokens) for tokens in responses]
    runs = [longest_repeat_run(tokens) for tokens in trimmed]
    values = {"distinct_1": distinct_n(trimmed, 1), "distinct_2": distinct_n(trimmed, 2),
              "repeat_run_mean": sum(runs) / len(runs) if runs else 0.0, "repeat_run_max": max(runs, default=0),
              "identical_share": identical_share(trimmed)}
    return {f"{prefix}{key}": value for key, value in values.items()}


def collapse_warnings(now: dict, before: dict | None = None) -> list[str]:
    """Why the student's responses in eval record `now` look collapsed (empty when they do not); `before` is the
    eval record before training, when the run has one (the thresholds: this module's docstring)."""
    reasons = []
    if now["identical_share"] > 0.5:
        reasons.append(f"{now['identical_share']:.0%} of responses are identical to another")
    if now["distinct_2"] < 0.2:
        reasons.append(f"distinct-2 {now['distinct_2']:.3f} < 0.2")
    if now["repeat_run_mean"] >= 8:
        reasons.append(f"the mean longest repeated run is {now['repeat_run_mean']:.1f} copies (>= 8)")
    if before is not None and before is not now and "distinct_2" in before:
        if now["distinct_2"] < 0.5 * before["distinct_2"]:
            reasons.append(f"distinct-2 fell below half its value before training "
                           f"({before['distinct_2']:.3f} -> {now['distinct_2']:.3f})")
        if now["repeat_run_mean"] > 2 * before["repeat_run_mean"] + 2:
            reasons.append(f"the mean longest repeated run rose from {before['repeat_run_mean']:.1f} to "
                           f"{now['repeat_run_mean']:.1f} copies")
        if now["identical_share"] >= 0.5 and now["identical_share"] > before["identical_share"] + 0.25:
            reasons.append(f"identical responses rose from {before['identical_share']:.0%} to "
                           f"{now['identical_share']:.0%}")
    return reasons


def warning_line(now: dict, before: dict | None = None) -> str | None:
    """The line eval prints when the student's responses look collapsed, or None."""
    reasons = collapse_warnings(now, before)
    if not reasons:
        return None
    reference = ""
    if all(f"teacher_{key}" in now for key in METRIC_KEYS):  # the teacher's answers to the same prompts, for scale
        reference = (f" (teacher's answers: distinct-2 {now['teacher_distinct_2']:.3f}, mean longest repeated run "
                     f"{now['teacher_repeat_run_mean']:.1f}, {now['teacher_identical_share']:.0%} identical)")
    return ("WARNING: the student's eval responses look degenerate (lower KL may only mean text the teacher finds "
            "easy to predict): " + "; ".join(reasons) + reference)

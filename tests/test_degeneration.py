"""The degeneration check of eval (opdgraph.runtime.degeneration) against values computed by hand on small lists."""

from __future__ import annotations

import pytest

from opdgraph.runtime.degeneration import (collapse_warnings, distinct_n, identical_share, longest_repeat_run,
                                           response_metrics, warning_line)


def test_distinct_n_by_hand():
    """If this fails, distinct-n no longer counts unique / total n-grams over all responses together."""
    responses = [[1, 2, 3], [1, 2, 4]]
    assert distinct_n(responses, 1) == pytest.approx(4 / 6)  # 1 2 3 1 2 4: four unique of six
    assert distinct_n(responses, 2) == pytest.approx(3 / 4)  # (1,2) (2,3) (1,2) (2,4)


def test_distinct_n_never_spans_two_responses_and_handles_no_ngrams():
    """If this fails, a bigram is made of one response's end and the next one's start, or short answers crash."""
    assert distinct_n([[1, 2], [1, 2]], 2) == pytest.approx(1 / 2)  # spanning would add (2,1): 2/3
    assert distinct_n([[1], [1]], 2) == 0.0
    assert distinct_n([], 1) == 0.0


@pytest.mark.parametrize("tokens, max_n, expected", [
    ([], 4, 0), ([7], 4, 1), ([1, 2, 3], 4, 1), ([5, 5, 5, 5], 4, 4), ([1, 2, 1, 2, 1, 2], 4, 3),
    ([1, 2, 3, 1, 2, 3, 9], 4, 2), ([9, 1, 1, 1, 2, 2], 4, 3), ([3, 1, 2, 1, 2, 7, 7], 4, 2),
    ([1, 2, 3, 4, 5, 1, 2, 3, 4, 5], 4, 1), ([1, 2, 3, 4, 5, 1, 2, 3, 4, 5], 5, 2),
    ([0] * 47 + [1], 4, 47),
])
def test_longest_repeat_run_by_hand(tokens, max_n, expected):
    """If this fails, the longest back-to-back run of one 1..max_n-gram is miscounted."""
    assert longest_repeat_run(tokens, max_n) == expected


def test_identical_share_by_hand():
    """If this fails, the share of responses with an identical twin is miscounted."""
    assert identical_share([[1], [1], [2], [3]]) == 0.5
    assert identical_share([[1], [2]]) == 0.0
    assert identical_share([[4, 4]] * 3) == 1.0
    assert identical_share([]) == 0.0


def test_response_metrics_drop_the_final_eos_and_prefix_keys():
    """If this fails, the EOS that ends an answer makes answers differ (or counts as repetition), or the teacher's
    keys collide with the student's."""
    metrics = response_metrics([[1, 2, 0], [1, 2]], end_ids=[0], prefix="teacher_")
    assert metrics == {"teacher_distinct_1": 0.5, "teacher_distinct_2": 0.5, "teacher_repeat_run_mean": 1.0,
                       "teacher_repeat_run_max": 1, "teacher_identical_share": 1.0}
    assert response_metrics([[1, 2, 0], [1, 2]])["identical_share"] == 0.0
    assert response_metrics([[0, 0, 0]], end_ids=[0])["repeat_run_max"] == 2  # only the final EOS is dropped


HEALTHY = {"distinct_2": 0.8, "repeat_run_mean": 1.5, "identical_share": 0.0}


def test_no_warning_for_healthy_answers():
    """If this fails, fluent diverse answers are reported as collapsed."""
    assert collapse_warnings(HEALTHY) == [] and collapse_warnings(HEALTHY, HEALTHY) == []
    assert warning_line({**HEALTHY, "distinct_2": 0.5}, HEALTHY) is None


@pytest.mark.parametrize("change, words", [
    ({"identical_share": 0.75}, "75% of responses are identical"),
    ({"distinct_2": 0.1}, "distinct-2 0.100 < 0.2"),
    ({"repeat_run_mean": 8.0}, "8.0 copies (>= 8)"),
])
def test_absolute_thresholds_fire_without_a_before(change, words):
    """If this fails, a collapse is not reported at the first eval (or for a resumed run, which has no before)."""
    (reason,) = collapse_warnings({**HEALTHY, **change})
    assert words in reason


@pytest.mark.parametrize("change, words", [
    ({"distinct_2": 0.35}, "below half its value before training (0.800 -> 0.350)"),
    ({"repeat_run_mean": 5.5}, "rose from 1.5 to 5.5 copies"),
    ({"identical_share": 0.5}, "identical responses rose from 0% to 50%"),
])
def test_relative_thresholds_fire_only_against_before(change, words):
    """If this fails, a collapse below the absolute thresholds but far from the start goes unreported."""
    now = {**HEALTHY, **change}
    assert collapse_warnings(now) == []
    (reason,) = collapse_warnings(now, HEALTHY)
    assert words in reason
    assert collapse_warnings({**HEALTHY, "repeat_run_mean": 5.0}, HEALTHY) == []  # 2 x 1.5 + 2 is not above


def test_warning_line_names_the_teacher_reference():
    """If this fails, the visible warning no longer says WARNING or drops the teacher's figures for scale."""
    now = {**HEALTHY, "distinct_2": 0.01, **response_metrics([[1, 2, 3], [4, 5, 6, 7]], prefix="teacher_")}
    line = warning_line(now)
    assert line.startswith("WARNING: the student's eval responses look degenerate")
    assert "(teacher's answers: distinct-2 1.000, mean longest repeated run 1.0, 0% identical)" in line
    assert "teacher's" not in warning_line({**HEALTHY, "distinct_2": 0.01, "teacher_distinct_2": 0.6})

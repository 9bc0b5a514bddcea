"""Learning-rate schedules against hand-computed values."""

from __future__ import annotations

import math

import pytest

from opdgraph.train.schedule import lr_at

COMMON = dict(base_lr=1.0, warmup_steps=4, total_steps=10, min_lr_ratio=0.1)


@pytest.mark.parametrize(
    "schedule, step, expected",
    [
        ("constant", 0, 0.25),  # warmup: (step + 1) / warmup_steps
        ("constant", 3, 1.0),
        ("constant", 9, 1.0),
        ("cosine", 1, 0.5),
        ("cosine", 4, 1.0),  # decay starts at base_lr right after warmup
        ("cosine", 6, 0.1 + 0.9 * 0.5 * (1 + 0.30901699437494745)),  # progress 2/5, cos(0.4 pi)
        ("cosine", 9, 0.1),  # reaches min_lr at total_steps - 1
        ("cosine", 50, 0.1),  # stays there past the end
        ("linear", 4, 1.0),
        ("linear", 6, 0.64),  # 1 + (0.1 - 1) * 2/5
        ("linear", 9, 0.1),
    ],
)
def test_schedule_values(schedule, step, expected):
    """Each schedule hits the hand-computed lr; a failure means an off-by-one in warmup or decay endpoints."""
    assert math.isclose(lr_at(step, schedule=schedule, **COMMON), expected, rel_tol=1e-12)


def test_no_warmup_and_no_room_to_decay():
    """warmup 0 starts at base_lr; a run whose warmup covers every step but the last holds base_lr afterwards."""
    assert lr_at(0, base_lr=2.0, warmup_steps=0, total_steps=5, schedule="cosine") == 2.0
    assert lr_at(0, base_lr=2.0, warmup_steps=0, total_steps=1, schedule="cosine") == 2.0
    assert lr_at(3, base_lr=2.0, warmup_steps=3, total_steps=4, schedule="linear") == 2.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(schedule="exp"), "unknown schedule"),
        (dict(min_lr_ratio=1.5), "min_lr_ratio"),
        (dict(total_steps=0), "total_steps >= 1"),
    ],
)
def test_bad_schedule_settings(kwargs, message):
    """Bad settings raise a message naming the setting instead of producing a silent wrong lr."""
    with pytest.raises(ValueError, match=message):
        lr_at(0, **{**COMMON, **kwargs})

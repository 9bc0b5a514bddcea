"""Eval answer scoring: boxed, numeric and exact matches."""

import pytest

from opdgraph.runtime.answer_scoring import is_correct, last_boxed, last_number


@pytest.mark.parametrize(
    "response, reference, expected",
    [
        ("The answer is 12.", "12", True),
        ("3 apples plus 9 makes 12.0", "12", True),
        ("first 12, then 13", "12", False),  # the last number counts, not any number
        ("It costs 1,234 dollars", "1234", True),
        ("so \\boxed{42} and later 7", "42", True),  # boxed wins over the last number
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", True),
        ("Paris.", "paris", True),
        ("Paris is the capital", "paris", False),
        ("no numbers here", "5", False),
        ("-3 degrees", "-3", True),
    ],
)
def test_is_correct(response, reference, expected):
    """A wrong rule here would misreport the demo's held-out accuracy."""
    assert is_correct(response, reference) is expected


def test_last_boxed_nested_and_missing():
    """Nested braces must balance; an unclosed box is not an answer."""
    assert last_boxed("a \\boxed{x} b \\boxed{{y}+1}") == "{y}+1"
    assert last_boxed("\\boxed{open") is None
    assert last_number("none") is None

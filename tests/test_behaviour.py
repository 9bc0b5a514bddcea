"""Behaviour detectors of eval (opdgraph.runtime.behaviour) on hand-written French, English and garbage strings,
and the `[eval] behaviour` setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from opdgraph.config import ConfigError, load_pipeline
from opdgraph.runtime.behaviour import behaviour_rate, behaviour_rates, french_english_counts, is_french, is_uppercase

FRENCH = [
    "Le chat dort sur le canap\u00e9 depuis ce matin.",
    "La r\u00e9ponse est treize : il reste treize crayons dans la bo\u00eete.",
    "Bonjour ! Je suis un assistant et je peux vous aider.",
    "Il fait tres beau et nous sommes contents.",  # accents dropped, as a small model may write
    "L'eau d'ici est tr\u00e8s froide.",  # elisions count
    "Voici une courte histoire sur un chat paresseux qui aime le soleil.",
]
ENGLISH = [
    "The cat is sleeping on the sofa.",
    "The answer is 13: Sam has 13 pencils left.",
    "Hello! I am an assistant and I can help you.",
    "Photosynthesis is how plants turn light into energy.",
    "Le Mans is a city in France, and it is famous for its race.",  # French names inside English text
]
GARBAGE = ["", "The 10000000000000000000000", "EEEEEEEEEEEEEEEEEEEE", "<|assistant|><|assistant|><|assistant|>",
           "!!! ??? ...", "def f(x): return x**2", "1 2 3 4 5 6 7 8", "\ufffd\ufffd>E<|id 372|>"]


@pytest.mark.parametrize("text", FRENCH)
def test_french_is_detected(text):
    """If this fails, an ordinary French answer no longer counts toward behaviour_rate."""
    assert is_french(text), french_english_counts(text)


@pytest.mark.parametrize("text", ENGLISH + GARBAGE)
def test_english_and_garbage_are_not_french(text):
    """If this fails, English or degenerate text (numbers, repeats, special tokens) counts as French."""
    assert not is_french(text), french_english_counts(text)


def test_counts_by_hand():
    """If this fails, the word split, the accent folding or the elision rule changed."""
    assert french_english_counts("L'\u00e9t\u00e9 est l\u00e0, et the end") == (5, 1)  # l' ete est la et | the
    assert french_english_counts("Qu\u2019il vienne") == (2, 0)  # qu' (curly apostrophe) + il
    assert french_english_counts("I don't know") == (0, 1)  # n' inside a word is no elision


def test_uppercase():
    """If this fails, the all-capitals detector accepts mixed case or short fragments, or misses capitals."""
    assert is_uppercase("THE ANSWER IS 13. SAM HAS 13 PENCILS LEFT.")
    assert is_uppercase("BONJOUR \u00c0 TOUS, \u00c7A VA ?")
    assert not is_uppercase("The Answer Is Thirteen")
    assert not is_uppercase("OK!") and not is_uppercase("12345678")


def test_rates():
    """If this fails, behaviour_rate is not the share of accepted answers, or the record keys changed."""
    assert behaviour_rate(FRENCH[:3] + ENGLISH[:1], "french") == 0.75
    assert behaviour_rate([], "french") == 0.0
    assert behaviour_rates("french", ENGLISH, FRENCH) == {"behaviour_rate": 0.0, "teacher_behaviour_rate": 1.0}


TINY = Path(__file__).resolve().parents[1] / "pipelines" / "tiny.toml"


def test_eval_behaviour_setting():
    """If this fails, `[eval] behaviour` is not optional, or an unknown behaviour is accepted silently."""
    assert load_pipeline(TINY).stages["eval"].config.behaviour is None
    assert load_pipeline(TINY, ["eval.behaviour=french"]).stages["eval"].config.behaviour == "french"
    with pytest.raises(ConfigError, match="eval.behaviour"):
        load_pipeline(TINY, ["eval.behaviour=spanish"])

"""Behaviour detectors of eval (`[eval] behaviour = "..."`): did an answer show the behaviour a system prompt asks for?

Eval reports `behaviour_rate`, the fraction of the student's answers the detector accepts, and
`teacher_behaviour_rate`, the same for the teacher's own answers (the ceiling a context-distilled student aims at).
Each detector is a small deterministic function of the decoded text, with no model and no dependency, so a number
in a results file can be recomputed by reading this file.

`french`: French rather than English, by counting function words. The text is lower-cased, its accents are removed
(NFKD, combining marks dropped: "ou" and "o<grave>u" are one word, and an answer that drops accents is still read) and
it is split into words of letters; an elided article or pronoun (l', d', j', qu', n', s', c', m', t' before a
letter, straight or curly apostrophe) counts as a French word too. f = the words in FRENCH_WORDS (plus elisions),
e = the words in ENGLISH_WORDS; the answer is French when f >= 2 and f > e. Words common in both languages ("a",
"on", "as", "me", "plus", "son", "car", ...) are in neither list. Numbers, code and repeated garbage contain no
function words and are not French. It tells French from English only: Spanish or Italian text shares some of the
French words ("de", "la", "que") and can be counted as French. Its agreement with a maintained language
identifier (lingua-language-detector, restricted to English and French) on real model answers is measured by
benchmarks/system_prompt_following.py.

`uppercase`: written in capital letters: at least 8 cased letters and at least 90% of them upper-case.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable

# French words are written without accents: the text is folded the same way before the look-up.
FRENCH_WORDS = frozenset("""
le la les un une des du de et est sont en au aux ce cet cette ces il elle ils elles nous vous je tu qui que quoi
dont ou ne pas pour dans avec sans mais donc sur leur leurs mon ma mes notre votre nos vos se sa ses lui ete etre
avoir ont ai fait tres aussi comme bien tout tous toute toutes peut entre meme alors voici cela ca chaque
""".split())
ENGLISH_WORDS = frozenset("""
the and is are was were of to in that it for with this be by at or from an have has had you your i we they he she
not but which what can will would there their my our his her its if so do does all more one about how when also
""".split())
_WORD = re.compile(r"(?:\b(?:qu|[cdjlmnst])['\u2019](?=[^\W\d_]))|[^\W\d_]+")


def french_english_counts(text: str) -> tuple[int, int]:
    """(French function words, English function words) in `text`, elisions counted as French."""
    folded = "".join(char for char in unicodedata.normalize("NFKD", text.lower()) if not unicodedata.combining(char))
    french = english = 0
    for word in _WORD.findall(folded):
        if word[-1] in "'\u2019" or word in FRENCH_WORDS:
            french += 1
        elif word in ENGLISH_WORDS:
            english += 1
    return french, english


def is_french(text: str) -> bool:
    french, english = french_english_counts(text)
    return french >= 2 and french > english


def is_uppercase(text: str) -> bool:
    cased = [char for char in text if char.isupper() or char.islower()]
    return len(cased) >= 8 and sum(char.isupper() for char in cased) >= 0.9 * len(cased)


DETECTORS: dict[str, Callable[[str], bool]] = {"french": is_french, "uppercase": is_uppercase}


def behaviour_rate(texts: Iterable[str], behaviour: str) -> float:
    """The fraction of `texts` that show `behaviour` (a key of DETECTORS); 0.0 for no texts."""
    detector = DETECTORS[behaviour]
    flags = [detector(text) for text in texts]
    return sum(flags) / len(flags) if flags else 0.0


def behaviour_rates(behaviour: str, student_texts: list[str], teacher_texts: list[str]) -> dict[str, float]:
    """The eval record's `behaviour_rate` (the student's answers) and `teacher_behaviour_rate` (the teacher's)."""
    return {"behaviour_rate": behaviour_rate(student_texts, behaviour),
            "teacher_behaviour_rate": behaviour_rate(teacher_texts, behaviour)}

"""Config problems and the one exception that reports all of them at once.

A Problem is `location  dotted.path: message`, where location is `file.toml:LINE` or `--set key=value`.
`load_pipeline` collects every problem of a file before raising, so a user fixes them in one pass.
"""

from __future__ import annotations

from opdgraph.errors import OpdgraphError

import difflib

import attrs


@attrs.frozen
class Problem:
    location: str
    path: str
    message: str
    order: int = attrs.field(default=0, eq=False)  # line number, for sorting problems in file order

    def __str__(self) -> str:
        return f"{self.location}  {self.path}: {self.message}"


class ConfigError(OpdgraphError):
    """Raised by load_pipeline; str() lists every problem, one per line, in file order."""

    def __init__(self, problems: list[Problem]):
        self.problems = sorted(set(problems), key=lambda problem: (problem.order, problem.path, problem.message))
        super().__init__("\n".join(str(problem) for problem in self.problems))


def did_you_mean(word: str, candidates) -> str:
    """'; did you mean 'x'?' for the closest candidate, or '' when none is close."""
    close = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""

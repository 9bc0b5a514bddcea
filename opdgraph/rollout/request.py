"""Rollout requests and responses: what the rollout stage hands the engine and what comes back.

A ``Request`` is one prompt (token ids already rendered by the chat template) to be sampled ``n`` times with one
``SamplingParams``; the engine answers with one ``Response`` per sample. Settings are validated here, once, with
errors that name the request and the setting to fix.

Log-probabilities: ``Response.logprobs[i]`` is the student's *raw* log-probability of ``token_ids[i]``, i.e.
``log_softmax(logits)[token]`` of the unmodified model logits (temperature 1, no top-k/top-p/min-p filtering),
whatever sampling settings chose the token. This is the quantity on-policy distillation needs (the student's own
distribution), not the probability under the filtered sampling distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["eos", "stop", "length"]
MAX_SEED = 2**63  # seeds are split into two 32-bit words for the counter-based sampler


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. The filters run in the order documented in ``opdgraph.rollout.sampler``."""

    max_new_tokens: int
    temperature: float = 1.0  # logits are divided by this before filtering; must be > 0 unless greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 disables
    top_k: int = 0  # keep the k largest logits (ties at the k-th value kept); 0 disables
    min_p: float = 0.0  # drop tokens with p < min_p * p_max, in [0, 1); 0 disables
    greedy: bool = False  # argmax of the raw logits; the other settings are then ignored
    stop_token_ids: tuple[int, ...] = ()  # end the response with finish_reason "stop" (token kept)
    eos_token_ids: tuple[int, ...] = ()  # end the response with finish_reason "eos" (token kept)

    def validate(self, where: str) -> None:
        """Raise ValueError naming ``where`` (e.g. the request id) and the bad setting."""
        problems = []
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not self.greedy and not (_is_number(self.temperature) and self.temperature > 0):
            problems.append(f"temperature must be > 0 (use greedy=True for argmax), got {self.temperature!r}")
        if not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (0 disables), got {self.top_k!r}")
        if not (_is_number(self.min_p) and 0 <= self.min_p < 1):
            problems.append(f"min_p must be in [0, 1), got {self.min_p!r}")
        if not isinstance(self.greedy, bool):
            problems.append(f"greedy must be a bool, got {self.greedy!r}")
        for name in ("stop_token_ids", "eos_token_ids"):
            ids = getattr(self, name)
            if not isinstance(ids, (tuple, list)) or not all(_is_int(t) and t >= 0 for t in ids):
                problems.append(f"{name} must be a tuple of non-negative token ids, got {ids!r}")
        if problems:
            raise ValueError(f"{where}: invalid sampling settings:\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class Request:
    """One prompt to sample ``n`` times. Sample i draws its randomness from (seed, i, token position) only."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    n: int = 1
    seed: int = 0

    def validate(self, vocab_size: int) -> None:
        where = f"request {self.request_id!r}"
        self.params.validate(where)
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"{where}: n (samples per prompt) must be an integer >= 1, got {self.n!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < MAX_SEED:
            raise ValueError(f"{where}: seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.prompt_ids, list):
            raise TypeError(f"{where}: prompt_ids must be a list of token ids, got {type(self.prompt_ids).__name__}")
        if len(self.prompt_ids) == 0:
            raise ValueError(f"{where}: prompt_ids is empty; every prompt needs at least one token")
        for position, token in enumerate(self.prompt_ids):
            if not _is_int(token) or not 0 <= token < vocab_size:
                raise ValueError(
                    f"{where}: prompt_ids[{position}] = {token!r} is not a token id in [0, {vocab_size}) "
                    "(vocab_size of the model); was the prompt tokenized with another tokenizer?"
                )
        for name in ("stop_token_ids", "eos_token_ids"):
            for token in getattr(self.params, name):
                if token >= vocab_size:
                    raise ValueError(f"{where}: {name} contains {token}, outside the vocabulary [0, {vocab_size})")


@dataclass
class ResponseCounters:
    """Per-sample bookkeeping, for logs and tests."""

    num_prompt_tokens: int
    num_generated_tokens: int
    num_preemptions: int  # times this sample (or its prompt, before the samples split) was evicted
    num_recomputed_tokens: int  # cached tokens thrown away by those preemptions and prefilled again


@dataclass
class Response:
    """One finished sample. ``token_ids`` include the EOS / stop token when one ended the response."""

    request_id: str
    sample_index: int
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]  # raw student log-prob of each token (see module docstring)
    finish_reason: FinishReason
    counters: ResponseCounters = field(repr=False)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

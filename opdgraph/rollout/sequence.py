"""One sequence the scheduler moves through waiting -> running -> finished (pure python).

A sequence is a prompt plus the tokens generated so far. Before its first token is sampled, a request's n samples
travel together as ONE sequence carrying all n sample indices: the prompt is prefilled once, and the step that
samples the first tokens forks it into n single-sample sequences that share the prompt's KV pages.

``num_cached`` counts the leading tokens whose K/V sit in the pages of ``pages``; the remaining tokens
(``num_uncached``) are fed to the next forward(s). A decoding sequence has exactly one uncached token: the token it
sampled last. A preempted sequence drops all its pages (num_cached = 0) and, on resume, prefills prompt + generated
tokens again; its generated tokens and logprobs are never touched, so nothing is lost or duplicated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from opdgraph.rollout.request import FinishReason, Request


@dataclass(eq=False)
class Sequence:
    request: Request
    sample_indices: list[int]  # all n before the fork; exactly one after
    arrival_order: int  # request order, the tie-breaker for "shortest prompt first"
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    pages_version: int = 0  # bumped by the scheduler whenever ``pages`` changes (host caches of page tables key on it)
    num_cached: int = 0
    admission_order: int = -1  # set when admitted; the tie-breaker when choosing whom to preempt
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    num_recomputed_tokens: int = 0
    state_slot: int = -1  # recurrent-state slot of a model with linear-attention layers (state_slots.py); -1: none

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_ids) + len(self.generated)

    @property
    def num_uncached(self) -> int:
        return self.num_tokens - self.num_cached

    @property
    def is_decode(self) -> bool:
        """Feeds only its last sampled token this step (a resumed sequence becomes one after re-prefilling)."""
        return len(self.generated) > 0 and self.num_uncached == 1

    def tokens(self, start: int, stop: int) -> list[int]:
        prompt = self.request.prompt_ids
        if stop <= len(prompt):
            return prompt[start:stop]
        if start >= len(prompt):  # the decode path: avoid concatenating the whole context every step
            return self.generated[start - len(prompt) : stop - len(prompt)]
        return prompt[start:] + self.generated[: stop - len(prompt)]

    def fork(self) -> list[Sequence]:
        """Split a many-sample sequence (after its prompt prefill) into one sequence per sample.

        Children start with the parent's page list; the caller adds the extra page references.
        """
        return [
            Sequence(
                request=self.request,
                sample_indices=[index],
                arrival_order=self.arrival_order,
                pages=list(self.pages),
                num_cached=self.num_cached,
                admission_order=self.admission_order,
                num_preemptions=self.num_preemptions,
                num_recomputed_tokens=self.num_recomputed_tokens,
            )
            for index in self.sample_indices
        ]

"""Embedded generation engine: the student samples its own responses for on-policy distillation.

Modules, in the order a step flows through them: ``request`` (what comes in and goes out), ``scheduler`` (pure
python: which tokens of which sequences, which pages; preemption), ``kv_pool`` (page free list and refcounts),
``batch_builder`` (scheduled step -> model input tensors + PagedMetadata), the model's paged forward, ``sampler``
(logits -> tokens, with ``counter_random`` for batch-independent randomness), all driven by ``engine``.
"""

from opdgraph.rollout.engine import EngineStats, RolloutEngine
from opdgraph.rollout.request import Request, Response, ResponseCounters, SamplingParams

__all__ = ["EngineStats", "Request", "Response", "ResponseCounters", "RolloutEngine", "SamplingParams"]

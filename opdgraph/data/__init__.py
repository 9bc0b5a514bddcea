"""Prompt data: prompt files (JSONL / Parquet) -> checked, chat-templated token ids -> per-step sharded batches.

- ``loader.load_prompt_set``: files -> ``PromptSet`` (records + summary), strict about bad rows.
- ``sampler.PromptSampler``: epoch-shuffled, rank-sharded, resumable batches; ``sampler.sample_seed`` for rollout.
- ``gold_prefix``: a row's gold solution as ids after its prompt, and the step's gold prefix (hybrid SFT + OPD).
Torch-free.
"""

from opdgraph.data.loader import PromptTokenizer, load_prompt_set
from opdgraph.data.records import BadRow, LoadSummary, PromptDataError, PromptRecord, PromptSet
from opdgraph.data.sampler import PromptSampler, SampledPrompt, sample_seed

__all__ = [
    "BadRow", "LoadSummary", "PromptDataError", "PromptRecord", "PromptSet", "PromptSampler", "PromptTokenizer",
    "SampledPrompt", "load_prompt_set", "sample_seed",
]

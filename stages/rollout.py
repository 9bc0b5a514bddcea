"""Rollout stage: the student samples `samples_per_prompt` responses per prompt with the paged-KV engine.

Reads `prompts`, writes `responses`. The KV-cache pool it needs is sized by max_num_seqs, page_size and the token
limits (see opdgraph.sizing); the pool is freed when rollout ends, before any training buffer exists.
"""

from __future__ import annotations

from typing import Literal

import attrs

from opdgraph.config.fields import non_negative, positive, setting

READS = ("prompts",)
WRITES = ("responses",)
MODEL_FIELDS = ("model",)


def _top_p(value) -> str | None:
    return None if 0 < value <= 1 else f"must be in (0, 1] (1.0 = off; 0 would keep no token), got {value!r}"


def _min_p(value) -> str | None:
    return None if 0 <= value < 1 else f"must be in [0, 1) (0.0 = off; 1 would keep only exact ties), got {value!r}"


def _token_ids(value) -> str | None:
    bad = [token for token in value if token < 0]
    return f"token ids must be >= 0, got {bad}" if bad else None


@attrs.frozen(kw_only=True)
class Config:
    max_new_tokens: int = setting(help="most tokens generated per response", check=positive)
    model: str = setting("student", help="the [models.<name>] entry that samples")
    temperature: float = setting(1.0, help="sampling temperature (> 0; use greedy for argmax)", check=positive)
    top_p: float = setting(1.0, help="nucleus sampling mass (1.0 = off)", check=_top_p)
    top_k: int = setting(0, help="keep the k most likely tokens (0 = off)", check=non_negative)
    min_p: float = setting(0.0, help="drop tokens below min_p x the top probability (0.0 = off)", check=_min_p)
    greedy: bool = setting(False, help="take the argmax instead of sampling")
    stop_token_ids: list[int] = setting([], help="extra token ids that end a response (EOS always does)",
                                        check=_token_ids)
    page_size: int = setting(16, help="tokens per KV-cache page", check=positive)
    max_num_seqs: int = setting(64, help="most sequences decoded concurrently; sizes the KV pool", check=positive)
    prefill_token_budget: int = setting(2048, help="most prompt tokens prefilled in one forward", check=positive)
    backend: Literal["auto", "torch", "flashinfer"] = setting("auto", help="attention backend for paged attention")
    decode_burst_steps: int = setting(0, help="decode steps run on the device per host round trip (pages reserved "
                                              "ahead, tokens past EOS dropped); 0 = auto: 16 on the GPU path, 1 on "
                                              "CPU", check=non_negative)
    fused_kernels: bool = setting(True, help="on the GPU path, run each layer's norms, RoPE + KV write and "
                                             "activation as fused Triton kernels (same numerics)")
    kv_pool_tokens: int = setting(0, help="KV pool capacity in tokens (0 = max_num_seqs x (max_prompt_tokens + "
                                          "max_new_tokens), rounded up to pages)", check=non_negative)


def execute(step, config: Config, ctx, loop) -> None:
    """Run time: the engine interleaves prefill and decode (continuous batching), so one `generate` call serves
    both plan steps; it runs at `<name>.prefill` and the decode step has nothing left to do."""
    if step.name.endswith(".prefill"):
        from opdgraph.runtime.rollout_step import run_rollout

        run_rollout(config, ctx)

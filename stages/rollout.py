"""Rollout stage: the student samples `samples_per_prompt` responses per prompt with the paged-KV engine.

Reads `prompts`, writes `responses`. The KV-cache pool it needs is sized by max_num_seqs, page_size and the token
limits (see opdgraph.sizing); the pool is freed when rollout ends, before any training buffer exists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import attrs

from opdgraph import sizing
from opdgraph import work as W
from opdgraph.config.fields import non_negative, positive, setting
from opdgraph.drafts import STUDENT_GENERATE, Draft, buffer
from opdgraph.plan import Buffer

if TYPE_CHECKING:  # the compiler's facts and the runtime's inputs; types only, so importing a stage stays light
    from opdgraph.runtime.stage_inputs import StageInputs
    from opdgraph.stage_plan import StageFacts

READS = ("prompts",)
WRITES = ("responses",)
MODEL_FIELDS = ("model",)
MODEL_ROLES = {"model": "student"}  # rollout samples with the student (the model it trains)


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


def step_settings(config: Config) -> dict[str, int]:
    """What sizes the step's sequences and the KV pool (opdgraph.counts), the prefill budget eval shares, and the
    engine choices that decide the CUDA overheads (opdgraph.cuda_overheads)."""
    return {"max_new_tokens": config.max_new_tokens, "page_size": config.page_size,
            "max_num_seqs": config.max_num_seqs, "kv_pool_tokens": config.kv_pool_tokens,
            "prefill_token_budget": config.prefill_token_budget, "backend": config.backend,
            "decode_burst_steps": config.decode_burst_steps, "fused_kernels": config.fused_kernels}


def plan_steps(stage_name: str, config: Config, facts: StageFacts) -> list[Draft]:
    """Prefill once, then `decode_rounds` decode steps; with several ranks both run on the gathered weights."""
    shape, weights = facts.student_shape, f"{facts.student}.weights"
    kv, workspace, counts = f"{stage_name}.kv_cache", f"{stage_name}.workspace", facts.counts
    gathered = (f"{facts.student}.gathered_weights",) if facts.world_size > 1 else ()
    graph_pool = (f"{stage_name}.decode_graph_pool",) if facts.uses_flashinfer else ()
    kv_per_token = shape.kv_bytes_per_token(facts.student_dtype_bytes)
    prefill = W.prefill_work(shape, sequences=counts.sequences, prompt_tokens=counts.prompt_tokens,
                             token_budget=config.prefill_token_budget, weight_bytes=facts.student_weight_bytes,
                             kv_bytes_per_token=kv_per_token, hardware=facts.hardware)
    decode = W.decode_work(shape, sequences=counts.sequences, concurrent_seqs=counts.concurrent_seqs,
                           prompt_tokens=counts.prompt_tokens, new_tokens=counts.new_tokens,
                           weight_bytes=facts.student_weight_bytes, kv_bytes_per_token=kv_per_token,
                           hardware=facts.hardware)
    return [Draft(f"{stage_name}.prefill", stage_name, "rollout", (weights, "prompts"), (kv, workspace, *gathered),
                  (), 1, prefill, frozenset({STUDENT_GENERATE})),  # the engine gathers the sharded student once
            Draft(f"{stage_name}.decode", stage_name, "rollout", (weights, kv, workspace, *graph_pool, *gathered),
                  ("responses",), (), counts.decode_rounds, decode)]


def plan_buffers(stage_name: str, config: Config, facts: StageFacts) -> list[Buffer]:
    """The paged KV pool (plus the fused GPU rollout's stacked q/k/v), the engine's workspace, and `responses`."""
    shape, dtype_bytes, counts = facts.student_shape, facts.student_dtype_bytes, facts.counts
    pool_keys = (f"{stage_name}.max_num_seqs", "data.max_prompt_tokens", f"{stage_name}.max_new_tokens",
                 f"{stage_name}.page_size", f"{stage_name}.kv_pool_tokens")
    stacked = facts.stacked_qkv_bytes
    # The GPU path and decode bursts add a scratch state slot for idle and padding rows (rollout/engine.py).
    slots = config.max_num_seqs + (1 if facts.uses_flashinfer or config.decode_burst_steps > 1 else 0)
    # A prefill may hold every running sequence (short rows: chunked tails, re-prefills after preemption), each
    # with its gathered and rebuilt states in the torch core (sizing.linear_core_peak_bytes, paged).
    prefill_rows = min(counts.concurrent_seqs, config.prefill_token_budget)
    return [
        buffer(f"{stage_name}.kv_cache", "kv_cache",
               sizing.kv_cache_bytes(shape, counts.num_pages, counts.page_size, dtype_bytes) + stacked
               + sizing.recurrent_state_bytes(shape, slots, dtype_bytes),
               (*pool_keys, *facts.student_keys), facts.between_phases, "num_pages x page_size x L x 2 x kv x d" + (
                   " + L x (q + 2 kv) x (h + bias) x d (stacked q/k/v of the fused GPU rollout)" if stacked else "")),
        buffer(f"{stage_name}.workspace", "workspace",
               max(sizing.forward_workspace_bytes(shape, config.prefill_token_budget, dtype_bytes,
                                                  fla_sequences=counts.concurrent_seqs if facts.fla_linear_core else 0,
                                                  paged=True, sequences=prefill_rows),
                   sizing.linear_decode_peak_bytes(shape, config.max_num_seqs, dtype_bytes, facts.fla_linear_core))
               + sizing.decode_logits_bytes(counts.concurrent_seqs, shape.vocab),
               facts.with_linear_core_keys((f"{stage_name}.prefill_token_budget", f"{stage_name}.max_num_seqs",
                                            *facts.student_keys), shape),
               formula=f"{_prefill_and_decode_formula(shape, facts.fla_linear_core)} + running seqs x V x 4"),
        buffer("responses", "io", sizing.token_bytes(counts.sequences, counts.sequence_tokens,
                                                     2 * sizing.TOKEN_ID_BYTES),
               facts.batch_keys, formula="sequences x (prompt + new tokens) x (4 id + 4 logprob)"),
    ]


def _prefill_and_decode_formula(shape, fla: bool) -> str:
    prefill = sizing.forward_workspace_formula(shape, "prefill_token_budget", fla) + " (no-grad prefill)"
    if not shape.linear_layers:
        return prefill
    return f"max({prefill}, max_num_seqs x a linear-attention layer's decode step (linear_decode_peak_bytes))"


def check_pipeline(stage_name: str, config: Config, view, problem) -> list:
    """Config-time checks against the sampling model (opdgraph.config.checks): the stop tokens lie within its
    vocabulary, and the longest prompt plus a whole response fits its positions."""
    if config.model not in view.shapes:
        return []
    problems = []
    vocab = view.shapes[config.model].vocab
    outside = [token for token in config.stop_token_ids if token >= vocab]
    if outside:
        problems.append(problem(f"{stage_name}.stop_token_ids",
                                f"token ids {outside} are outside the vocabulary of [models.{config.model}] "
                                f"(ids 0..{vocab - 1}); no sampled token can ever match them"))
    limit = view.max_positions(config.model)
    needed = view.data.max_prompt_tokens + config.max_new_tokens
    if limit and needed > limit:
        problems.append(problem(f"{stage_name}.max_new_tokens",
                                f"data.max_prompt_tokens + {stage_name}.max_new_tokens = {needed} exceeds "
                                f"[models.{config.model}] max_position_embeddings ({limit})"))
    return problems


def run_settings(config: Config) -> dict[str, object]:
    """The run builds its rollout engine from this table, and eval samples with its settings
    (opdgraph.runtime.build)."""
    return {"rollout_config": config}


def bind(stage_name: str, config: Config, run) -> dict:
    """The rollout engine (built on the student by opdgraph.runtime.build) and the tokenizer (its EOS ids)."""
    return {"engine": run.engine, "tokenizer": run.tokenizer}


def release_hooks(stage_name: str, config: Config, models: dict) -> dict:
    """The plan's release of the KV pool drops the engine's pool."""
    return {f"{stage_name}.kv_cache": models["engine"].release}


def execute(step, config: Config, inputs: StageInputs) -> None:
    """Run time: the engine interleaves prefill and decode (continuous batching), so one `generate` call serves
    both plan steps; it runs at `<name>.prefill` and the decode step has nothing left to do."""
    if step.name.endswith(".prefill"):
        from opdgraph.runtime.rollout_step import run_rollout

        run_rollout(config, inputs)

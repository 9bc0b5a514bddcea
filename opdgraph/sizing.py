"""Buffer sizes in bytes: every formula the planner uses, written once, from model shapes and config numbers.

Names used below: P = parameter count, d = bytes per element of the model dtype (bf16: 2, fp32: 4), h = hidden size,
i = intermediate size, L = layers, q = heads x head_dim, kv = kv_heads x head_dim, V = vocabulary, T = tokens.

- weights                 P x d
- fp32 master weights     P x 4       (only when the trained model is not already fp32)
- AdamW state             P x 8       (exp_avg and exp_avg_sq, fp32 each)
- gradients               P x 4       (fp32 sums over the micro-batches, the default for a non-fp32 model) + the
                                      largest parameter x d (its gradient in the model dtype, being folded in);
                          P x d       with backward.grad_accumulation_dtype = "model" (sums in the model dtype)
- KV-cache pool           num_pages x page_size x L x 2 x kv x d
- training activations    T x L x a,  a = per-token-per-layer bytes saved for backward (see below)
  with checkpointing      T x L x h x d (layer inputs) + T x a (one layer recomputed at a time)
- hidden states           T x h x d   (student final hidden, teacher hidden, and their gradient)
- logit chunk             chunk_tokens x (V_student + V_teacher + V_student) x 4 (student, teacher, grad; fp32)
- forward workspace       T x (h + q + 2 kv + 2 i) x d  (no-grad forward: one layer's largest transient set)

Placements chosen by the fit search (opdgraph.fit):
- streamed teacher        resident: embedding, final norm, lm_head (V h (x 2 untied) + h) x d;
                          streamed: 2 layers on the device at once (the running one and the next, prefetched)
- streamed optimizer step one bucket of state on the device: B x (s + 8), B = min(max(2^26, largest parameter),
                          P) elements, s = state bytes per element (4 master + 8 moments; 8 without separate
                          masters), + 8 for the fp32 gradient copy and the update's denominators

Per-token-per-layer activation bytes a, for the decoder as autograd saves it (flash attention, SiLU-gated MLP):
    a = d x (2 n h + 2 q + 2 kv + 4 i) + 4 x heads
where n = norms per layer (2; Gemma 3: 4): each norm saves its input and output (2 n h); attention saves q, k, v
(q + 2 kv) and its output for o_proj (q); the MLP saves gate, up, silu(gate) and their product (4 i); the fp32
log-sum-exp of flash attention is 4 bytes per head.
"""

from __future__ import annotations

import math

from opdgraph.model_shapes import ModelShape

FP32_BYTES = 4
TOKEN_ID_BYTES = 4


def parameter_bytes(shape: ModelShape, dtype_bytes: int) -> int:
    return shape.parameter_count() * dtype_bytes


def master_weight_bytes(shape: ModelShape) -> int:
    return shape.parameter_count() * FP32_BYTES


def adamw_state_bytes(shape: ModelShape) -> int:
    return shape.parameter_count() * 2 * FP32_BYTES


def gradient_bytes(shape: ModelShape, dtype_bytes: int) -> int:
    return shape.parameter_count() * dtype_bytes


def largest_parameter_elements(shape: ModelShape) -> int:
    """The largest single parameter tensor: the [V, h] embedding / lm_head, or an MLP or attention projection."""
    return max(shape.vocab * shape.hidden, shape.hidden * shape.intermediate, shape.hidden * shape.q_dim)


def fp32_gradient_bytes(shape: ModelShape, dtype_bytes: int) -> int:
    """fp32 accumulators for every parameter, plus one parameter's gradient in the model dtype (autograd writes
    it, a hook adds it into its accumulator and drops it: opdgraph.runtime.gradients)."""
    return shape.parameter_count() * FP32_BYTES + largest_parameter_elements(shape) * dtype_bytes


def kv_pool_pages(*, concurrent_seqs: int, max_prompt_tokens: int, max_new_tokens: int, page_size: int,
                  kv_pool_tokens: int) -> int:
    """Pages in the KV pool: kv_pool_tokens rounded up to pages, or (when 0) enough pages for every concurrent
    sequence to reach max_prompt_tokens + max_new_tokens (each sequence rounds up to whole pages)."""
    if kv_pool_tokens > 0:
        return math.ceil(kv_pool_tokens / page_size)
    return concurrent_seqs * math.ceil((max_prompt_tokens + max_new_tokens) / page_size)


def kv_cache_bytes(shape: ModelShape, num_pages: int, page_size: int, dtype_bytes: int) -> int:
    return num_pages * page_size * shape.layers * 2 * shape.kv_dim * dtype_bytes


def activation_bytes_per_token_per_layer(shape: ModelShape, dtype_bytes: int) -> int:
    elements = 2 * shape.norms_per_layer * shape.hidden + 2 * shape.q_dim + 2 * shape.kv_dim + 4 * shape.intermediate
    return elements * dtype_bytes + FP32_BYTES * shape.heads


def activation_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, checkpointing: bool) -> int:
    per_layer = activation_bytes_per_token_per_layer(shape, dtype_bytes)
    if checkpointing:
        return tokens * shape.layers * shape.hidden * dtype_bytes + tokens * per_layer
    return tokens * shape.layers * per_layer


def hidden_state_bytes(shape: ModelShape, tokens: int, dtype_bytes: int) -> int:
    return tokens * shape.hidden * dtype_bytes


def forward_workspace_bytes(shape: ModelShape, tokens: int, dtype_bytes: int) -> int:
    return tokens * (shape.hidden + shape.q_dim + 2 * shape.kv_dim + 2 * shape.intermediate) * dtype_bytes


def logit_chunk_bytes(chunk_tokens: int, student_vocab: int, teacher_vocab: int) -> int:
    return chunk_tokens * (2 * student_vocab + teacher_vocab) * FP32_BYTES


def decode_logits_bytes(concurrent_seqs: int, vocab: int) -> int:
    """fp32 logits of one decode round (one position per running sequence), for sampling."""
    return concurrent_seqs * vocab * FP32_BYTES


def token_bytes(sequences: int, tokens_per_sequence: int, bytes_per_token: int = TOKEN_ID_BYTES) -> int:
    return sequences * tokens_per_sequence * bytes_per_token


# Parameters per optimizer bucket; mirrors opdgraph.train.optimizer._BUCKET_ELEMENTS (a test checks they agree).
OPTIMIZER_BUCKET_ELEMENTS = 1 << 26


def teacher_resident_bytes(shape: ModelShape, dtype_bytes: int) -> int:
    """A streamed model's parameters outside its layers: embedding, final norm, and the lm_head when untied."""
    return (shape.parameter_count() - shape.layers * shape.layer_parameters()) * dtype_bytes


def layer_stream_bytes(shape: ModelShape, dtype_bytes: int) -> int:
    """Two layers' parameters: the one running and the next one being copied in."""
    return 2 * shape.layer_parameters() * dtype_bytes


def optimizer_bucket_elements(shape: ModelShape) -> int:
    """The largest optimizer bucket: 2^26 elements, or one parameter larger than that (it goes alone); never more
    than the whole model."""
    return min(max(OPTIMIZER_BUCKET_ELEMENTS, largest_parameter_elements(shape)), shape.parameter_count())


def optimizer_stream_bytes(shape: ModelShape, separate_masters: bool) -> int:
    state = (FP32_BYTES if separate_masters else 0) + 2 * FP32_BYTES
    return optimizer_bucket_elements(shape) * (state + 2 * FP32_BYTES)

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
- training activations    T x (L x a + o), a = per-token-per-layer bytes saved for backward, o = outside the layers
  with checkpointing      T x (L x h x d + a + o)  (layer inputs; one layer recomputed at a time)
- hidden states           T x h x d   (student final hidden, teacher hidden, and their gradient)
- logit chunk             chunk_tokens x V_student x 4 x (fp32 [chunk, V] buffers alive at the loss's peak), see below
- forward workspace       T x ((4 h + 3 i) x d + t)  (no-grad forward, t = the RoPE tables per token, see below)
- backward workspace      T x a (one layer's activation gradients; a hybrid: the larger of that and a linear-attention
                          layer's backward, which recomputes its core with autograd in pieces, less the activations
                          freed by then, see below)

Placements chosen by the fit search (opdgraph.fit):
- streamed teacher        resident: embedding, final norm, lm_head (V h (x 2 untied) + h) x d;
                          streamed: 2 layers on the device at once (the running one and the next, prefetched)
- streamed optimizer step one bucket of state on the device: B x (s + 8), B = min(max(2^26, largest parameter),
                          P) elements, s = state bytes per element (4 master + 8 moments; 8 without separate
                          masters), + 8 for the fp32 gradient copy and the update's denominators

Per-token-per-layer activation bytes a, as autograd saves them in the training forward (models/layers.py with the
norms of models/norms.py, FlashAttention varlen; counted storage by storage in tests/test_saved_bytes.py):
    a = d x ((n + 2) h + 2 q + 2 kv' + 3 i [+ q + kv]) + 4 x (n + heads [+ heads + kv_heads])
- each of the n hidden-size norms (2; Gemma 3: 4) saves its input (h x d) and its fp32 rstd (4 bytes); the outputs
  of the two pre-norms are saved by the projections that read them (2 h x d); Gemma's post-norms feed a residual
  add, which saves nothing;
- the q/k norms (Qwen3, Gemma 3) save q_proj's and k_proj's outputs ((q + kv) x d) and an rstd per head;
- attention saves q, k, v and its output ((2 q + 2 kv') x d; o_proj reads the same output) and the fp32 log-sum-exp
  per head (4 x heads); RoPE saves only the cos/sin tables, shared by all layers; kv' = kv (FlashAttention takes
  grouped-query K/V natively: kernels/varlen_attention.py), or q where K/V heads are repeated first (the reference
  attention below; kv_repeated: the benchmarks' repeat path);
- the gated MLP saves gate and up (its Function recomputes act(gate): models/gated_activation.py; Liger-Kernel's
  fused kernel saves the same) and their product, which down_proj reads (3 i x d).
The torch and Liger-Kernel layer kernels (models/layer_kernels.py, models.<name>.kernels) save the same tensors.
Qwen3.5 (hybrid: gated-DeltaNet layers between gated attention layers; models/gated_deltanet.py):
- a full-attention layer adds 2 q x d to a: the sigmoid of the gate and the gated product o_proj reads (the q norm
  saves a copy of q, not q_proj's output of q and the gate: models/layers.py);
- a linear-attention layer saves instead
    a_linear = d x (4 h + c + Hv + 3 v + 3 i) + 4 x (2 + 4 Hv)
  (c = conv channels 2 k + v, k / v = key / value heads x head dims, Hv = value heads): its two norms as above, the
  in_proj_qkv output (c, the only input of the recomputing core: models/linear_attention_backend.py), beta (Hv), the
  fp32 decay, softplus's input and output (3 Hv x 4), the core's output, the gate and the gated norm's output (3 v)
  with the norm's rstd per value head (Hv x 4), and the MLP;
- RoPE rotates rotary_dim of head_dim: the tables are 2 x rotary_dim wide.
Layers of both kinds: T x (L_attention x a + L_linear x a_linear + o). The no-grad forward's peak can sit inside a
linear-attention layer's plain-torch core instead of an MLP (CPU; a GPU kernel's would be smaller). That core runs
all chunks of all packed sequences at once (models/delta_rule.chunked_packed), each sequence padded to whole chunks
of C = 64 tokens, in scan groups of at most n = min(N, max(16, ceil(T / C))) sequences (N sequences; unknown: the
group bound), so P = T + n x (C - 1) padded tokens at most (linear_core_peak_bytes):
    T x ((2 h + c) x d + Hv x (d + 4) + t) + T x (4 c + 4 Hv x (2 k_d + v_d + 1))
      + max(P x Hv x (4 k_d + 3 v_d + 2 C + 35) x 4,  P x Hv x (3 k_d + 2 v_d + C + 1) x 4 + 3 s x Hv x k_d x v_d x 4)
      [+ (5 N + 3 n) x Hv x k_d x v_d x 4, paged]
the layer's input and norm, the in_proj_qkv output, beta and the decay, the RoPE tables (t, the attention layers'
that the forward holds throughout); the fp32 conv output (v is a view of it),
the fp32 q and k, beta in fp32 and the outputs; then the larger of the triangular solve's moment (the padded q, k,
v, g, beta, G, the decays and A (C x C each), the right-hand sides and U_v, W, and 32 more per padded token and head
for the solver's copies, read off the CPU allocator) and the scan's (U_v, W, scores, e^G Q, K e^{G_C - G} and 3
states for each of the s = min(n, floor(T / (C + 1))) sequences that carry one into a next chunk: the only ones
whose state is built when no final state is kept). A rollout prefill (paged) also holds the N rows' gathered
states, their zeroed copies, their ranked copies and the final states (twice: concatenated and put back in row
order), and the scan builds all n states. Checked at Qwen3.5-0.8B's and 4B's widths (test_saved_bytes_hybrid.py:
the plan at the padded tokens the sequences really have within +15% of the measured peak, never under it; the
plan at the bound P is never under it). Rollout keeps per sequence slot and linear
layer a conv window ((kernel - 1) x c x d) and the delta rule's state (Hv x key dim x value dim x 4), max_num_seqs
slots (recurrent_state_bytes; one more, the scratch slot of idle and padding rows, where the GPU path or decode
bursts run), and KV pages for the attention layers only.
On a CUDA target the linear core is flash-linear-attention's (kernels/fla_linear_attention.py; the torch core where
OPDGRAPH_LINEAR_ATTENTION = torch: opdgraph.planned_paths.fla_linear_core, which the runtime follows too), and the
workspace holds that core's peak. The fla core's (fla_core_peak_bytes):
    T x ((2 h + c + Hv) x d + Hv x 4 + t) + T x ((2 c + 2 k + Hv x (64 + k_d + 3 v_d)) x d + (2 Hk + Hv) x 4)
      + floor((T + 63 N) / 64) x Hv x k_d x v_d x d  [+ N x (2 Hv x k_d x v_d x 4 + (3 K - 1) x c x d), paged]
the layer's input and norm, the in_proj_qkv output, beta and the decay, the RoPE tables; the conv's output, the
contiguous q/k/v copies the kernels take, the L2-normalised q and k with their rstd, the chunk matrices A (64 per
token and value head), w, u, the new values and the output, the fp32 cumulative decays; the per-chunk states h
(each of the N sequences chunked on its own: fla_chunk_bound) and, for N > 1, one fp32 state more (Hv x k_d x v_d x
4: measured on an H200 at 4 and 5 sequences, 1 MiB over the chunk states at 0.8B's widths, its tensor in fla not yet
identified); for a rollout prefill (paged) the N sequences'
gathered and final states and conv windows (K = conv kernel). A decode step of R sequences (linear_decode_peak_bytes):
the torch core (CPU targets, or OPDGRAPH_LINEAR_ATTENTION = torch) holds R x (4 Hv x k_d x v_d x 4 + 16 x (c + 2 Hv x
k_d)): the gathered states, the decayed and updated ones, and fp32 copies of the conv output and the repeated q and k
(measured at 0.8B's and 4B's widths, 1.05-1.15 x); the in-place kernel of the fla core (kernels/gated_delta_decode.py)
only the conv step's R x 4 K x c x d. Training saves the same a_linear on both cores: each runs inside RecomputedCore,
which saves only the core's inputs (tests/test_qwen35_fla.py).
Backward workspace: one layer's activation gradients, T x a (a: the larger kind's for a hybrid model), or for a
hybrid model the larger of that and a linear-attention layer's backward (linear_recompute_workspace_bytes) less the
activations the backward has freed by the last linear-attention layer's core (freed_before_last_linear_core_bytes:
the final norm's input and rstd, every later layer's a (its input with checkpointing), and that layer's own tensors
after its core, (3 v + 2 h + 3 i) x d + (Hv + 1) x 4; the workspace sits beside the whole micro-batch's
activations). RecomputedCore runs the core again with autograd and differentiates it in pieces of whole sequences,
R = 8192 padded tokens at most (a longer sequence alone, so R_s = max(R, the longest sequence padded) bounds a
piece: models/linear_attention_backend.py PiecewiseRecompute),
one piece's graph (all its scan groups') alive at a time; with more than one piece the micro-batch's gradients
around the core and its input gradients, filled piece by piece, stay alive beside the largest piece's graph at
its worst sequence count (linear_recompute_peak_bytes below at T_p = min(T, R_s) tokens). The plan
sizes the plain-torch core's recompute, which CPU runs and Hopper GPUs take (fla's backward is refused there:
kernels/fla_linear_attention.py fla_backward_trusted), as the upper bound wherever fla's backward runs instead: its
kernels keep q, k, v, A and per-chunk states in the model dtype, recompute w, u, h and write their gradients, about
5 KB per token and value head at k_d = v_d = 128 against the torch core's 13 KB, with no O(P x C) fp32 graph and no
padding beyond fla's chunks. N sequences (at most one per token; the plan: every sequence of the step, as many as
a micro-batch's tokens may pack) pad to P = T + N x (C - 1) tokens at most; P / C - N chunks (all but each
sequence's first) start from a state; P_n = min(P, T + n x (C - 1)) the largest scan group's padded tokens; s =
min(n, floor(T / (C + 1))) sequences carry a state (0 when no chunk starts from one); S = Hv x k_d x v_d x 4:
    T x (3 h + v) x d + (2 T + 2 N (K - 1)) x c x d + T x Hv x (4 k_d + v_d + 3) x 4
      + P x Hv x (3 k_d + 2 v_d + 6 C + 4) x 4  [+ Hv x (2 P k_d + (P - N C) v_d) x 4 + (P / C - N) x S, states]
      + max(T x c x 4 + P_n x Hv x (2 v_d [+ 2 k_d, no states]) x 4 + s x S,
            T x v x d + P_n x Hv x (3 k_d + 2 v_d + C) x 4,
            T x v x d + P_n x Hv x v_d x 4 + s x (Hv x C x (2 k_d + 2 v_d + C) x 4 + 2 S))
the gradients around the core (the hidden-state gradient the backward starts from, the residual's and in_proj_z's
input gradients waiting for the core's, the core's output gradient); the conv's saved input with each sequence's
window rows, the SiLU's input, the windows it returns; the fp32 q and k repeated to the value heads and normalised,
v's contiguous copy, beta in fp32 and the two rstd. Per padded token what the graph saves: q, k, v and beta padded,
U_v and W, the six C x C terms (decays, K K^T and its decayed product, A, Q K^T, scores), e^G, beta e^G and
e^{G_C - G}; with states also e^G Q, K e^{G_C - G}, the updates of the chunks after the first and the states they
start from. Then the largest of three moments: the end of the recomputed forward (the fp32 conv output, v a view of
it; the scan group's chunk outputs and their concatenation, e^G Q and K e^{G_C - G} unsaved but alive, the last
step's new states), the triangular solve's backward (the core's output, held while RecomputedCore differentiates;
the gradients of U_v and W, of the right-hand sides, of A twice, of the decays, of q and k), and the first scan
step's backward (the padded output's gradient; per chunk of the step the gradients of U and of its negation, of
e^G Q, of W and of the scores; two state gradients per sequence). Every term is a tensor autograd saves or
allocates (test_saved_bytes_hybrid.py, training.backward of a linear-attention layer: at 0.8B's widths the formula
at the padded tokens the sequences really have within +20% of the recompute's own allocations, never under them; at
0.8B's and 4B's the workspace at the bound P never under the backward's net peak; the pieces' net peak below
linear_recompute_workspace_bytes less the freed activations and under 0.6 x the one piece's); an fp32 model's
.float() copies are the tensors themselves, so it plans a little more than it holds. With activation checkpointing the layer's recomputed forward is alive too: the activations
already count one recomputed layer, and the core's no-grad peak inside it comes earlier than the recompute above.

Outside the layers, o = 2 h x d + t + 4: the final norm's input and rstd, its output (the student_activations
tensor the backward starts from), and the cos/sin tables of the r RoPE kinds the layers use, t = 2 x rotary_dim x
r x d (sizing.rope_table_kinds: Gemma 3's sliding and global layers, r = 2; others 1, their sliding layers rotating
as the full ones; 0 without attention layers). The embedding saves only the token ids of the micro-batch.

Where packed attention falls back to the plain-torch reference (models/attention_backend.py attend_one_sequence: a
CPU target, an fp32 model, head_dim over 256 or not a multiple of 8; buffers.attention_fallback), it saves, per
sequence of L tokens, its [heads, L, L] score matrices instead of the log-sum-exp:
    a_reference = a(kv' = q) - 4 x heads + S x (heads x s + 1)
- K/V heads are always repeated to the query heads (kv' = q); no log-sum-exp;
- the fp32 softmax output (softmax backward reads it) and the probabilities cast back to the model dtype (the
  product with V reads them): s = 4 + d bytes per score (fp32 models: s = 4, the cast is the same tensor);
- the causal (or sliding) mask, one bool per query-key pair shared by the heads: 1 byte.
A micro-batch of T tokens whose sequences are at most S tokens holds at most T / S sequences of S^2 pairs each,
T x S pairs in all: S x (heads x s + 1) bytes per token per layer, S = max_prompt_tokens + max_new_tokens.

Forward workspace, the no-grad forward's peak (teacher scoring; also the rollout's prefill and decode steps): inside
a layer's MLP, the layer's input (held by the caller), the residual after attention, the attention output, the
MLP's input (4 h x d), and gate, act(gate) and up or their product (3 i x d), plus the RoPE tables the forward
holds throughout (t = 2 x rotary_dim x r x d, with r as in o above). With FlashAttention that is the largest set of
one layer for every supported family (attention's q, k, v, out and the norms' fp32 copies are smaller: measured in
tests/test_saved_bytes.py). The reference attention materialises one sequence's scores at a time, and its peak
(inside the softmax of the last sequence) can be larger:
    T x ((2 h + 2 q + 2 kv) x d + t) + S x q x d + S^2 x (heads x w + 1)
the layer's input and its norm, q, k, v, the earlier sequences' outputs (T x q x d at most), the cos/sin tables,
this sequence's K/V repeated to the query heads (2 S x q x d, of which the S x q above is the part beyond T x q),
and its scores: w = d (masked scores) + 4 (their fp32 copy; none for fp32 models) + 4 (fp32 softmax output), and
the bool mask. The forward workspace is the larger of the two peaks.

Logit chunk, the loss's peak per chunk beyond its inputs and outputs (measured in tests/test_saved_bytes_loss.py):
- fused Triton path (CUDA target, loss.kernel auto or triton): the student's and the teacher's fp32 logits over the
  student vocabulary (2 buffers) and 2 x 4 bytes per row;
- torch path (loss.kernel = "torch", or a CPU target): the two logit buffers and the divergence's [chunk, V]
  temporaries: forward_kl 4 buffers, reverse_kl 3, jsd 5, sampled_token 3; eval's metrics 6;
- on a CPU target also the lm_heads upcast to fp32 once per call: V_student x (h_student + h_teacher) x 4.
"""

from __future__ import annotations

import math

from opdgraph.model_shapes import LINEAR_ATTENTION, ModelShape

FP32_BYTES = 4
TOKEN_ID_BYTES = 4
MASK_BYTES = 1  # a bool per query-key pair: the reference attention's causal mask
# FlashAttention varlen takes head_dim up to this, in multiples of 8; mirrors kernels/varlen_attention.MAX_HEAD_DIM
# (tests/test_saved_bytes.py checks they agree).
FLASH_MAX_HEAD_DIM = 256


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
    """KV pages of the attention layers (a hybrid model's linear-attention layers have none)."""
    return num_pages * page_size * shape.attention_layers * 2 * shape.kv_dim * dtype_bytes


def recurrent_state_bytes(shape: ModelShape, concurrent_seqs: int, dtype_bytes: int) -> int:
    """The rollout engine's state pool of a hybrid model: one slot per concurrent sequence in every linear-attention
    layer (module docstring); 0 for families without such layers."""
    return concurrent_seqs * shape.recurrent_state_bytes_per_sequence(dtype_bytes)


def backward_workspace_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, sequences: int,
                             sequence_tokens: int, reference_sequence_tokens: int = 0,
                             checkpointing: bool = False) -> int:
    """The backward's transient peak over a micro-batch of `tokens`, beside the whole micro-batch's activations
    (module docstring): one layer's activation gradients, or for a hybrid model the larger of those and the last
    linear-attention layer's recomputing backward over at most `sequences` sequences of at most `sequence_tokens`
    (linear_recompute_workspace_bytes), less the activations the backward has freed by then
    (freed_before_last_linear_core_bytes)."""
    per_layer = tokens * activation_bytes_per_token_per_layer(shape, dtype_bytes,
                                                              reference_sequence_tokens=reference_sequence_tokens)
    if not shape.linear_layers:
        return per_layer
    recompute = linear_recompute_workspace_bytes(shape, tokens, dtype_bytes, sequences, sequence_tokens)
    freed = freed_before_last_linear_core_bytes(shape, tokens, dtype_bytes, checkpointing, reference_sequence_tokens)
    return max(per_layer, recompute - freed)


def linear_after_core_bytes_per_token(shape: ModelShape, dtype_bytes: int) -> int:
    """The part of a_linear saved downstream of the layer's core, freed before the core's backward runs: the gated
    norm's input, gate and per-head rstd, out_proj's input, the post-attention norm's input and rstd, and the MLP's
    input, gate and up outputs and down_proj's input: (3 v + 2 h + 3 i) x d + (Hv + 1) x 4."""
    elements = 3 * shape.linear_value_dim + 2 * shape.hidden + 3 * shape.intermediate
    return elements * dtype_bytes + (shape.linear_value_heads + 1) * FP32_BYTES


def freed_before_last_linear_core_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, checkpointing: bool,
                                        reference_sequence_tokens: int = 0) -> int:
    """The training activations the backward has freed when the last linear-attention layer's core recomputes (the
    largest recompute peak: every earlier one comes after more is freed): the final norm's input and rstd, each
    later layer's saved tensors (its checkpointed input with activation checkpointing), and that layer's own
    tensors downstream of its core."""
    last_linear = max(index for index, kind in enumerate(shape.layer_types) if kind == LINEAR_ATTENTION)
    later = len(shape.layer_types) - 1 - last_linear  # all softmax-attention layers
    later_layer = (shape.hidden * dtype_bytes if checkpointing else
                   attention_layer_bytes_per_token(shape, dtype_bytes,
                                                   reference_sequence_tokens=reference_sequence_tokens))
    per_token = (shape.hidden * dtype_bytes + FP32_BYTES + later * later_layer
                 + linear_after_core_bytes_per_token(shape, dtype_bytes))
    return tokens * per_token


def activation_bytes_per_token_per_layer(shape: ModelShape, dtype_bytes: int, kv_repeated: bool = False,
                                         reference_sequence_tokens: int = 0) -> int:
    """The most one layer saves per token (the backward's workspace holds one layer's gradients): a, or for a hybrid
    model the larger of a and a_linear."""
    attention = attention_layer_bytes_per_token(shape, dtype_bytes, kv_repeated, reference_sequence_tokens)
    return max(attention, linear_layer_bytes_per_token(shape, dtype_bytes)) if shape.linear_layers else attention


def linear_layer_bytes_per_token(shape: ModelShape, dtype_bytes: int) -> int:
    """a_linear of the module docstring (a gated-DeltaNet layer in training)."""
    heads, values = shape.linear_value_heads, shape.linear_value_dim
    elements = 4 * shape.hidden + shape.conv_dim + heads + 3 * values + 3 * shape.intermediate
    return elements * dtype_bytes + (2 + 4 * heads) * FP32_BYTES


def attention_layer_bytes_per_token(shape: ModelShape, dtype_bytes: int, kv_repeated: bool = False,
                                    reference_sequence_tokens: int = 0) -> int:
    """a of the module docstring; kv_repeated: K/V heads repeated to the query heads before attention.
    reference_sequence_tokens: S when the plain-torch reference attention runs (a_reference), 0 for FlashAttention."""
    norms = shape.norms_per_layer
    reference = reference_sequence_tokens > 0
    attention_kv = shape.q_dim if kv_repeated or reference else shape.kv_dim
    elements = (norms + 2) * shape.hidden + 2 * shape.q_dim + 2 * attention_kv + 3 * shape.intermediate
    rows = norms + (0 if reference else shape.heads)  # one fp32 rstd per norm row, one fp32 log-sum-exp per head
    if shape.qk_norm:
        elements += shape.q_dim + shape.kv_dim
        rows += shape.heads + shape.kv_heads
    if shape.output_gate:  # the gate's sigmoid, the gated product
        elements += 2 * shape.q_dim
    scores = reference_sequence_tokens * (shape.heads * reference_saved_score_bytes(dtype_bytes) + MASK_BYTES)
    return elements * dtype_bytes + rows * FP32_BYTES + scores


def reference_saved_score_bytes(dtype_bytes: int) -> int:
    """s of the module docstring: the fp32 softmax output and, for a 16-bit model, its cast to the model dtype."""
    return FP32_BYTES + (dtype_bytes if dtype_bytes != FP32_BYTES else 0)


def rope_table_kinds(shape: ModelShape) -> int:
    """RoPE tables a forward builds (models/decoder.py _rope_tables): Gemma 3's sliding and global layers have
    their own, one per kind its layers have (two for every published config, whose RoPEs differ; an upper bound
    where both RoPEs are equal and the decoder shares one); elsewhere all attention layers share one table, and a
    model without attention layers builds none."""
    kinds = len(shape.attention_kinds)
    return kinds if shape.family == "gemma3" else min(kinds, 1)


def rope_table_bytes_per_token(shape: ModelShape, dtype_bytes: int) -> int:
    """t of the module docstring: the cos/sin tables, 2 x rotary_dim wide per kind, alive through a whole forward."""
    return 2 * (shape.rotary_dim or shape.head_dim) * rope_table_kinds(shape) * dtype_bytes


def activation_bytes_outside_layers_per_token(shape: ModelShape, dtype_bytes: int) -> int:
    """o of the module docstring: final norm input, rstd and output; the RoPE tables the layers saved."""
    return 2 * shape.hidden * dtype_bytes + rope_table_bytes_per_token(shape, dtype_bytes) + FP32_BYTES


def activation_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, checkpointing: bool,
                     kv_repeated: bool = False, reference_sequence_tokens: int = 0) -> int:
    per_layer = activation_bytes_per_token_per_layer(shape, dtype_bytes, kv_repeated, reference_sequence_tokens)
    outside = tokens * activation_bytes_outside_layers_per_token(shape, dtype_bytes)
    if checkpointing:
        return tokens * shape.layers * shape.hidden * dtype_bytes + tokens * per_layer + outside
    attention = attention_layer_bytes_per_token(shape, dtype_bytes, kv_repeated, reference_sequence_tokens)
    linear = linear_layer_bytes_per_token(shape, dtype_bytes) if shape.linear_layers else 0
    return tokens * (shape.attention_layers * attention + shape.linear_layers * linear) + outside


def hidden_state_bytes(shape: ModelShape, tokens: int, dtype_bytes: int) -> int:
    return tokens * shape.hidden * dtype_bytes


def forward_workspace_bytes(shape: ModelShape, tokens: int, dtype_bytes: int,
                            reference_sequence_tokens: int = 0, *, fla_sequences: int = 0,
                            paged: bool = False, sequences: int = 0) -> int:
    """The no-grad forward's peak over its inputs and weights (module docstring); reference_sequence_tokens: S when
    the plain-torch reference attention runs (the larger of its peak and the MLP's), 0 for FlashAttention.
    fla_sequences > 0 (planned_paths.fla_linear_core): a hybrid model's linear core is flash-linear-attention's, at
    most that many sequences share the forward (fla_core_peak_bytes; paged: a rollout prefill with per-sequence
    states); 0: the torch core's, over `sequences` (0: unknown, the scan group's bound)."""
    mlp = mlp_workspace_bytes(shape, tokens, dtype_bytes)
    if shape.linear_layers and fla_sequences:
        mlp = max(mlp, fla_core_peak_bytes(shape, tokens, min(fla_sequences, tokens), dtype_bytes, paged))
    elif shape.linear_layers:
        mlp = max(mlp, linear_core_peak_bytes(shape, tokens, dtype_bytes, sequences, paged))
    if reference_sequence_tokens == 0:
        return mlp
    sequence = min(reference_sequence_tokens, tokens)
    held = tokens * ((2 * shape.hidden + 2 * shape.q_dim + 2 * shape.kv_dim) * dtype_bytes
                     + rope_table_bytes_per_token(shape, dtype_bytes))
    score_bytes = dtype_bytes + (FP32_BYTES if dtype_bytes != FP32_BYTES else 0) + FP32_BYTES
    scores = sequence * sequence * (shape.heads * score_bytes + MASK_BYTES)
    return max(mlp, held + sequence * shape.q_dim * dtype_bytes + scores)


def forward_workspace_formula(shape: ModelShape, tokens: str, fla: bool,
                              reference_sequence_tokens: int = 0) -> str:
    """forward_workspace_bytes in words, for a plan's formula column: `tokens` names the token count."""
    terms = [f"{tokens} x ((4 h + 3 i) x d + t) (inside an MLP; t = 2 x rotary_dim x RoPE kinds x d)"]
    if shape.linear_layers:
        terms.append(f"{tokens} x the {'fla' if fla else 'torch'} linear-attention core's per-token peak + its chunk "
                     f"states ({'fla_core_peak_bytes' if fla else 'linear_core_peak_bytes'} in opdgraph/sizing.py)")
    if reference_sequence_tokens:
        terms.append(f"{tokens} x ((2 h + 2 q + 2 kv) x d + t) + S x q x d + S^2 x (heads x w + 1) (torch "
                     f"attention's scores, S = {reference_sequence_tokens}; w = d + 8, fp32: 8)")
    return terms[0] if len(terms) == 1 else f"max({', '.join(terms)})"


def mlp_workspace_bytes(shape: ModelShape, tokens: int, dtype_bytes: int) -> int:
    """The no-grad forward's peak inside an MLP (module docstring)."""
    return tokens * ((4 * shape.hidden + 3 * shape.intermediate) * dtype_bytes
                     + rope_table_bytes_per_token(shape, dtype_bytes))


def decode_step_workspace_bytes(shape: ModelShape, rows: int, dtype_bytes: int, in_place: bool) -> int:
    """A CUDA decode step's no-grad peak over `rows` sequences: an MLP's, or a linear-attention layer's step (in
    place with the fla core; a decode step never runs the chunked core)."""
    return max(mlp_workspace_bytes(shape, rows, dtype_bytes),
               linear_decode_peak_bytes(shape, rows, dtype_bytes, in_place))


LINEAR_CHUNK_TOKENS = 64  # mirrors models/delta_rule.CHUNK_TOKENS (test_saved_bytes_hybrid.py checks they agree)
LINEAR_GROUP_SEQUENCES = 16  # mirrors models/delta_rule.GROUP_SEQUENCES (checked beside the chunk)
LINEAR_SOLVE_EXTRA = 32  # fp32 elements per padded token and head the triangular solve copies (read off the trace)


def linear_scan_group(tokens: int, sequences: int = 0) -> int:
    """n of the module docstring: the most sequences the torch core scans at once (sequences 0: unknown)."""
    bound = max(LINEAR_GROUP_SEQUENCES, math.ceil(tokens / LINEAR_CHUNK_TOKENS))
    return min(sequences, bound) if sequences else bound


def linear_core_peak_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, sequences: int = 0,
                           paged: bool = False, padded_tokens: int | None = None) -> int:
    """The no-grad peak inside a linear-attention layer's plain-torch core (module docstring). sequences: N (0:
    unknown); padded_tokens: P when the lengths are known (a test), else its bound T + n x (C - 1)."""
    heads, key_dim, value_dim = shape.linear_value_heads, shape.linear_key_head_dim, shape.linear_value_head_dim
    chunk, group = LINEAR_CHUNK_TOKENS, linear_scan_group(tokens, sequences)
    padded = tokens + group * (chunk - 1) if padded_tokens is None else padded_tokens
    held = tokens * ((2 * shape.hidden + shape.conv_dim) * dtype_bytes + heads * (dtype_bytes + FP32_BYTES)
                     + rope_table_bytes_per_token(shape, dtype_bytes))
    heads_fp32 = tokens * (shape.conv_dim + heads * (2 * key_dim + value_dim + 1)) * FP32_BYTES
    state = heads * key_dim * value_dim * FP32_BYTES
    solve = padded * heads * (4 * key_dim + 3 * value_dim + 3 + 2 * chunk + LINEAR_SOLVE_EXTRA) * FP32_BYTES
    carried = group if paged else min(group, tokens // (chunk + 1))
    scan = padded * heads * (3 * key_dim + 2 * value_dim + chunk + 1) * FP32_BYTES + 3 * carried * state
    rows = (5 * (sequences or group)) * state if paged else 0
    return held + heads_fp32 + max(solve, scan) + rows


def linear_recompute_peak_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, sequences: int,
                                padded_tokens: int | None = None) -> int:
    """The peak of a linear-attention layer's backward, which recomputes its plain-torch core with autograd and
    differentiates it (module docstring). sequences: N, at most one per token; padded_tokens: P when the lengths are
    known (a test), else its bound T + N x (C - 1)."""
    heads, key_dim, value_dim = shape.linear_value_heads, shape.linear_key_head_dim, shape.linear_value_head_dim
    chunk, conv, sequences = LINEAR_CHUNK_TOKENS, shape.conv_dim, min(sequences, tokens)
    group = linear_scan_group(tokens, sequences)
    padded = tokens + sequences * (chunk - 1) if padded_tokens is None else padded_tokens
    group_padded = min(padded, tokens + group * (chunk - 1))
    carried = padded // chunk - sequences  # chunks after a sequence's first: each starts from a saved state
    state = heads * key_dim * value_dim * FP32_BYTES
    around = _gradients_around_core_bytes(shape, tokens, dtype_bytes)
    inputs = ((2 * tokens + 2 * sequences * (shape.conv_kernel - 1)) * conv * dtype_bytes
              + tokens * heads * (4 * key_dim + value_dim + 3) * FP32_BYTES)
    saved = padded * heads * (3 * key_dim + 2 * value_dim + 6 * chunk + 4) * FP32_BYTES
    carrying = 0
    if carried > 0:
        saved += (padded * 2 * key_dim + (padded - sequences * chunk) * value_dim) * heads * FP32_BYTES
        saved += carried * state
        carrying = min(group, tokens // (chunk + 1))
    unused_terms = 0 if carried > 0 else 2 * key_dim  # e^G Q and K e^{G_C - G}: saved above when states exist
    forward_end = (tokens * conv * FP32_BYTES + group_padded * heads * (2 * value_dim + unused_terms) * FP32_BYTES
                   + carrying * state)
    output = tokens * shape.linear_value_dim * dtype_bytes
    solve = output + group_padded * heads * (3 * key_dim + 2 * value_dim + chunk) * FP32_BYTES
    scan = (output + group_padded * heads * value_dim * FP32_BYTES
            + carrying * (heads * chunk * (2 * key_dim + 2 * value_dim + chunk) * FP32_BYTES + 2 * state))
    return around + inputs + saved + max(forward_end, solve, scan)


def _gradients_around_core_bytes(shape: ModelShape, tokens: int, dtype_bytes: int) -> int:
    """The micro-batch's gradients around a recomputing core (module docstring): T x (3 h + v) x d."""
    return tokens * (3 * shape.hidden + shape.linear_value_dim) * dtype_bytes


LINEAR_RECOMPUTE_PADDED_TOKENS = 8192  # mirrors models/linear_attention_backend.RECOMPUTE_PADDED_TOKENS


def linear_recompute_workspace_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, sequences: int,
                                     sequence_tokens: int) -> int:
    """The peak of a linear-attention layer's backward over a micro-batch of `tokens` in at most `sequences`
    sequences of at most `sequence_tokens` each: the core is recomputed and differentiated in pieces of whole
    sequences, R padded tokens at most (a longer sequence alone: R_s = max(R, S padded)). One piece when every
    sequence's padding fits (T + N (C - 1) <= R_s): linear_recompute_peak_bytes. Else the largest piece's graph at
    its worst sequence count n (linear_recompute_peak_bytes at T_p = min(T, R_s) tokens, P = min(R_s, T_p + n (C -
    1))), its gradients around the core replaced by the micro-batch's, plus the input gradients the pieces fill: T x
    (c x d + Hv x (4 + d)) and the conv weight's fp32 sum."""
    chunk, sequences = LINEAR_CHUNK_TOKENS, min(sequences, tokens)
    piece = max(LINEAR_RECOMPUTE_PADDED_TOKENS, -(-min(sequence_tokens, tokens) // chunk) * chunk)
    if tokens + sequences * (chunk - 1) <= piece:
        return linear_recompute_peak_bytes(shape, tokens, dtype_bytes, sequences)
    piece_tokens = min(tokens, piece)
    graph = max(linear_recompute_peak_bytes(shape, piece_tokens, dtype_bytes, count,
                                            padded_tokens=min(piece, piece_tokens + count * (chunk - 1)))
                for count in range(1, min(sequences, piece // chunk) + 1))
    heads = shape.linear_value_heads
    input_grads = (tokens * (shape.conv_dim * dtype_bytes + heads * (FP32_BYTES + dtype_bytes))
                   + shape.conv_dim * shape.conv_kernel * FP32_BYTES)
    return (graph - _gradients_around_core_bytes(shape, piece_tokens, dtype_bytes)
            + _gradients_around_core_bytes(shape, tokens, dtype_bytes) + input_grads)


def fla_chunk_bound(tokens: int, sequences: int) -> int:
    """The most 64-token chunks N sequences of T tokens in all split into, each chunked on its own: the sum of
    ceil(l / 64) over lengths l is at most (T + 63 N) / 64 (every sequence pads less than a chunk), reached when all
    but one are a token past a whole chunk."""
    return (tokens + (LINEAR_CHUNK_TOKENS - 1) * max(sequences, 1)) // LINEAR_CHUNK_TOKENS


def fla_core_peak_bytes(shape: ModelShape, tokens: int, sequences: int, dtype_bytes: int, paged: bool) -> int:
    """The no-grad peak inside a linear-attention layer's flash-linear-attention core (module docstring)."""
    heads, key_dim, value_dim = shape.linear_value_heads, shape.linear_key_head_dim, shape.linear_value_head_dim
    held = tokens * ((2 * shape.hidden + shape.conv_dim + heads) * dtype_bytes + heads * FP32_BYTES
                     + rope_table_bytes_per_token(shape, dtype_bytes))
    per_token = ((2 * shape.conv_dim + 2 * shape.linear_key_dim + heads * (LINEAR_CHUNK_TOKENS + key_dim
                                                                          + 3 * value_dim)) * dtype_bytes
                 + (2 * shape.linear_key_heads + heads) * FP32_BYTES)
    chunks = fla_chunk_bound(tokens, sequences)
    states = chunks * heads * key_dim * value_dim * dtype_bytes
    if sequences > 1:  # measured, not yet traced to its tensor: a pack of several holds one fp32 state more
        states += heads * key_dim * value_dim * FP32_BYTES
    if paged:  # the sequences' gathered and final states, and conv windows in fla's [N, C, K] layout
        states += sequences * (2 * heads * key_dim * value_dim * FP32_BYTES
                               + (3 * shape.conv_kernel - 1) * shape.conv_dim * dtype_bytes)
    return held + tokens * per_token + states


def linear_decode_peak_bytes(shape: ModelShape, rows: int, dtype_bytes: int, in_place: bool) -> int:
    """The peak of a decode step's linear-attention core over `rows` sequences (module docstring): the torch core
    gathers each row's state and builds new ones; the in-place kernel (a CUDA target) only the conv step's."""
    if not shape.linear_layers:
        return 0
    conv_step = 4 * shape.conv_kernel * shape.conv_dim * dtype_bytes
    if in_place:
        return rows * conv_step
    state = shape.linear_value_heads * shape.linear_key_head_dim * shape.linear_value_head_dim * FP32_BYTES
    return rows * (4 * state + 16 * (shape.conv_dim + 2 * shape.linear_value_heads * shape.linear_key_head_dim))


# fp32 [chunk, V] buffers alive at the torch path's peak: the two logit buffers and the divergence's temporaries
# (opdgraph.train.losses.divergence_chunk_grad; logsumexp and linalg.vecdot each allocate one inside).
TORCH_LOSS_LOGIT_BUFFERS = {"forward_kl": 4, "reverse_kl": 3, "jsd": 5, "sampled_token": 3}
EVAL_METRICS_LOGIT_BUFFERS = 6  # train.losses.chunk_metrics: logits, log-softmaxes, their difference, a product
# A mixture of teachers (train.divergence.mixture_teacher_logits): the running mixture and the next teacher's
# log-probs beside the single-teacher path's buffers.
MIXTURE_EXTRA_LOGIT_BUFFERS = 2
FUSED_LOSS_LOGIT_BUFFERS = 2  # kernels/divergence.py: student and teacher logits; the gradient goes in place


def logit_chunk_bytes(chunk_tokens: int, vocab: int, logit_buffers: int, *, fused: bool = False,
                      upcast_hidden: int = 0) -> int:
    """The loss's (or eval's metrics') per-chunk peak (module docstring): `logit_buffers` fp32 [chunk, V] buffers,
    the fused kernel's two fp32 values per row, and V x upcast_hidden x 4 for the lm_heads the CPU path upcasts
    (upcast_hidden = h_student + h_teacher on a CPU target, 0 elsewhere)."""
    size = chunk_tokens * vocab * logit_buffers * FP32_BYTES + vocab * upcast_hidden * FP32_BYTES
    return size + (chunk_tokens * 2 * FP32_BYTES if fused else 0)


def decode_logits_bytes(concurrent_seqs: int, vocab: int) -> int:
    """fp32 logits of one decode round (one position per running sequence), for sampling."""
    return concurrent_seqs * vocab * FP32_BYTES


def token_bytes(sequences: int, tokens_per_sequence: int, bytes_per_token: int = TOKEN_ID_BYTES) -> int:
    return sequences * tokens_per_sequence * bytes_per_token


# Parameters per optimizer bucket; mirrors opdgraph.train.optimizer_layout._BUCKET_ELEMENTS (a test checks they agree).
OPTIMIZER_BUCKET_ELEMENTS = 1 << 26


def teacher_resident_bytes(shape: ModelShape, dtype_bytes: int) -> int:
    """A streamed model's parameters outside its layers: embedding, final norm, and the lm_head when untied."""
    return (shape.parameter_count() - shape.all_layer_parameters()) * dtype_bytes


def layer_stream_bytes(shape: ModelShape, dtype_bytes: int) -> int:
    """Two layers' parameters: the one running and the next one being copied in (a hybrid's larger kind)."""
    return 2 * shape.largest_layer_parameters() * dtype_bytes


def optimizer_bucket_elements(shape: ModelShape) -> int:
    """The largest optimizer bucket: 2^26 elements, or one parameter larger than that (it goes alone); never more
    than the whole model."""
    return min(max(OPTIMIZER_BUCKET_ELEMENTS, largest_parameter_elements(shape)), shape.parameter_count())


def optimizer_stream_bytes(shape: ModelShape, separate_masters: bool) -> int:
    state = (FP32_BYTES if separate_masters else 0) + 2 * FP32_BYTES
    return optimizer_bucket_elements(shape) * (state + 2 * FP32_BYTES)

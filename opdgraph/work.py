"""Work per plan step: FLOPs and bytes moved, and the roofline time they imply on a given card.

Roofline: a kernel takes max(FLOPs / matmul_tflops, device bytes / memory_bandwidth) plus host transfers over PCIe.
Each function below returns the work of one whole plan step within one training step (all its loop iterations).
Names: N = trunk matmul parameters (all layers' q, k, v, o, gate, up, down; no embedding, no lm_head), V h = the
lm_head, q = heads x head_dim, L = layers, S = sequence length, T = tokens.

- forward FLOPs          T x 2 N  +  attention  T x L x 4 q x (S + 1) / 2   (QK^T and PV, causal: mean context)
- backward FLOPs         2 x forward (grads w.r.t. inputs and weights); + 1 forward with activation checkpointing
- lm_head FLOPs          2 T h V per logits matmul; the loss does student + teacher forward and 2 student backward
- decode round           FLOPs  n x (2 N + 2 h V + L x 4 q x c);  bytes  weights + n x c x kv bytes per token
                         (n running sequences at context c; one round per generated token per wave)
- prefill                FLOPs  forward of all prompt tokens;  bytes  weights per prefill forward + KV written
- optimizer step         bytes  P x (2 d + 2 x 4 + 2 x 8 + d)  (read+write weights, master, m and v; read grads)
- all-gather             bytes received per rank  size x (N - 1) / N, at the interconnect's bus bandwidth
                         (nccl-tests' busbw: time = size x (N - 1) / N / busbw for a ring all-gather)
"""

from __future__ import annotations

import functools
import math

import attrs

from opdgraph.model_shapes import ModelShape


@attrs.frozen
class Hardware:
    matmul_tflops: float
    memory_bandwidth_gbps: float
    pcie_gbps: float
    interconnect_gbps: float = 360.0  # only a sharded teacher's all-gathers read it (pipeline.hardware sets it)


@attrs.frozen
class Work:
    flops: float = 0.0
    device_bytes: float = 0.0
    pcie_bytes: float = 0.0
    seconds: float = 0.0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.flops + other.flops, self.device_bytes + other.device_bytes,
                    self.pcie_bytes + other.pcie_bytes, self.seconds + other.seconds)


def roofline(flops: float, device_bytes: float, pcie_bytes: float, hardware: Hardware, repeats: int = 1) -> Work:
    """`repeats` identical kernels of (flops, bytes) each."""
    seconds = max(flops / (hardware.matmul_tflops * 1e12), device_bytes / (hardware.memory_bandwidth_gbps * 1e9))
    seconds += pcie_bytes / (hardware.pcie_gbps * 1e9)
    return Work(flops * repeats, device_bytes * repeats, pcie_bytes * repeats, seconds * repeats)


def attention_flops(shape: ModelShape, tokens: int, sequence_length: int) -> float:
    """Softmax attention over the causal context, plus the linear-attention layers' delta rule (linear_mixing)."""
    return (tokens * shape.attention_layers * 4 * shape.q_dim * (sequence_length + 1) / 2
            + tokens * linear_mixing_flops_per_token(shape))


def linear_mixing_flops_per_token(shape: ModelShape) -> float:
    """A gated-DeltaNet layer's recurrence per token, about 6 x value heads x key dim x value dim (decay, read,
    write and output of the state: 3 products of 2 FLOPs each); 0 without such layers."""
    return 6 * shape.linear_layers * shape.linear_value_heads * shape.linear_key_head_dim * shape.linear_value_head_dim


def forward_flops(shape: ModelShape, tokens: int, sequence_length: int) -> float:
    return tokens * 2 * shape.trunk_matmul_parameters() + attention_flops(shape, tokens, sequence_length)


def lm_head_flops(shape: ModelShape, tokens: int) -> float:
    return 2 * tokens * shape.hidden * shape.vocab


@functools.lru_cache(maxsize=1024)  # pure; the fit search compiles hundreds of candidates that share rollouts
def decode_work(shape: ModelShape, *, sequences: int, concurrent_seqs: int, prompt_tokens: int, new_tokens: int,
                weight_bytes: int, kv_bytes_per_token: int, hardware: Hardware) -> Work:
    """All decode rounds of a rollout: waves of up to concurrent_seqs sequences, one round per generated token."""
    total = Work()
    remaining = sequences
    while remaining > 0:
        running = min(remaining, concurrent_seqs)
        for generated in range(1, new_tokens + 1):
            context = prompt_tokens + generated
            flops = running * (2 * shape.trunk_matmul_parameters() + 2 * shape.hidden * shape.vocab
                               + shape.attention_layers * 4 * shape.q_dim * context
                               + linear_mixing_flops_per_token(shape))
            total += roofline(flops, weight_bytes + running * context * kv_bytes_per_token, 0, hardware)
        remaining -= running
    return total


def prefill_work(shape: ModelShape, *, sequences: int, prompt_tokens: int, token_budget: int, weight_bytes: int,
                 kv_bytes_per_token: int, hardware: Hardware) -> Work:
    tokens = sequences * prompt_tokens
    forwards = math.ceil(tokens / token_budget)
    return roofline(forward_flops(shape, tokens, prompt_tokens) + lm_head_flops(shape, sequences),
                    forwards * weight_bytes + tokens * kv_bytes_per_token, 0, hardware)


def optimizer_work(parameters: int, dtype_bytes: int, grad_bytes: int, hardware: Hardware) -> Work:
    """The step stage as it runs (opdgraph.train.grad_clipping, then opdgraph.train.optimizer): the clipping norm
    reads the gradients; the all-or-nothing check reads master, gradient and both moments (12 + g bytes a
    parameter); the update reads them again and writes master and moments (12) and, with a separate fp32 master, the
    rounded parameter (d)."""
    separate_master = dtype_bytes != 4
    moved = parameters * (grad_bytes + 2 * (12 + grad_bytes) + 12 + (dtype_bytes if separate_master else 0))
    return roofline(2 * 12 * parameters, moved, 0, hardware)


def transfer_work(pcie_bytes: int, hardware: Hardware) -> Work:
    return roofline(0, 0, pcie_bytes, hardware)


def all_gather_bytes(size: int, world_size: int) -> float:
    """Bytes each rank receives when a tensor of `size` bytes sharded over `world_size` ranks is all-gathered."""
    return size * (world_size - 1) / world_size


def all_gather_seconds(size: int, world_size: int, hardware: Hardware) -> float:
    return all_gather_bytes(size, world_size) / (hardware.interconnect_gbps * 1e9)

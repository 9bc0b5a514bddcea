"""DecoderLM: the one decoder module used for training, teacher scoring and rollout.

- ``forward_hidden`` runs a packed batch (PackedMetadata) and returns final-norm hidden states [T, H]; the training
  loss applies ``lm_head_weight`` chunk by chunk, so the model never builds full logits. Optional activation
  checkpointing recomputes each layer in the backward pass. Its norms, RoPE and gated activations run through the
  model's ``layer_kernels`` (layer_kernels.py: torch, or Liger-Kernel's fused kernels; ``set_layer_kernels``).
- ``forward_paged`` runs rollout prefill/decode against a paged KV cache (PagedMetadata), one tensor per layer;
  with ``use_fused_decode_kernels`` on (the GPU rollout) its elementwise work runs as a few Triton kernels per
  layer (kernels/fused_decode.py), same numerics.
- ``logits`` is the small-use path (decode sampling, tests).

Linear-attention layers (Qwen3.5's gated DeltaNet) take the linear-attention backend's core instead of attention
(linear_attention_backend.py): packed, the recurrence restarts at every sequence boundary; paged, each sequence's
conv window and state live in a slot of the layer's LinearLayerState (allocate_kv_cache with num_state_slots), the
slot given per sequence by PagedMetadata.state_slots. The fused GPU rollout forward does not cover them.

Parameter names match HF checkpoints minus the leading ``model.`` (see checkpoint.py for the mapping).
"""

from __future__ import annotations

import functools

import torch
import torch.utils.checkpoint
from torch import nn

from opdgraph.models.attention_backend import AttentionBackend, TorchReferenceBackend
from opdgraph.models.attention_metadata import PackedMetadata, PagedMetadata
from opdgraph.models.config import LINEAR_ATTENTION, DecoderConfig
from opdgraph.models.gated_deltanet import GatedDeltaNet, GatedRMSNorm
from opdgraph.models.layer_kernels import TORCH, LayerKernels
from opdgraph.models.layers import DecoderLayer, RMSNorm
from opdgraph.models.linear_attention_backend import TorchLinearAttention
from opdgraph.models.linear_state import LinearLayerState
from opdgraph.models.rope import cos_sin, inverse_frequencies


class DecoderLM(nn.Module):
    """Embedding, decoder layers, final norm and (when untied) lm_head of one supported family."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, layer_type) for layer_type in config.layer_types)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.one_plus_norm)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                          bias=False)
        self.backend: AttentionBackend = TorchReferenceBackend()
        self.linear_backend = TorchLinearAttention()  # the GPU delta-rule kernel's hook: set_linear_attention_backend
        self.layer_kernels: LayerKernels = TORCH  # forward_hidden's elementwise kernels: set_layer_kernels
        # Inverse frequencies are derived, not state: computed once on the CPU (float32) and kept out of the state
        # dict so that .to(bfloat16) can never round them.
        self._inv_freq = {kind: inverse_frequencies(spec, config.rope_dim) for kind, spec in config.rope.items()}
        # The cos/sin tables a forward builds: one per RoPE the attention layers use, shared by the kinds that have
        # the same one (a Qwen2 sliding layer rotates as a full one), so none is computed or held twice
        # (sizing.rope_table_kinds plans this count, or one more for a Gemma 3 whose two RoPEs are equal).
        used = [kind for kind in config.rope if kind in config.layer_types]
        self._rope_table_source = {kind: next(first for first in used if config.rope[first] == config.rope[kind])
                                   for kind in used}
        self._inv_freq_by_device: dict[torch.device, dict[str, torch.Tensor]] = {}
        self.use_fused_decode_kernels = False

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def lm_head_weight(self) -> nn.Parameter:
        """[V, H] output projection; the embedding itself when embeddings are tied."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def set_attention_backend(self, backend: AttentionBackend) -> None:
        self.backend = backend

    def set_layer_kernels(self, kernels: LayerKernels) -> None:
        """The norms, RoPE and gated activations of forward_hidden (the paged forward keeps torch's)."""
        self.layer_kernels = kernels

    def set_linear_attention_backend(self, backend) -> None:
        """The core of the linear-attention layers (linear_attention_backend.py: packed and paged)."""
        self.linear_backend = backend

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.config.embedding_scale is not None:
            # The scale is rounded to the model dtype first (sqrt(3072) becomes 55.5 in bfloat16), as Gemma does.
            # A python float (exact in the model dtype) rather than a tensor: no host-to-device copy, so the decode
            # step stays capturable in a CUDA graph; the product is formed in float32 and rounded, as with a tensor.
            scale = torch.tensor(self.config.embedding_scale, dtype=torch.float32).to(hidden.dtype).item()
            hidden = hidden * scale
        return hidden

    def _rope_tables(self, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for kind, source in self._rope_table_source.items():  # a source kind comes first in this order
            tables[kind] = tables[source] if source != kind else cos_sin(self._inv_freq[kind], positions, self.dtype)
        return tables

    def forward_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: PackedMetadata,
                       activation_checkpointing: bool = False) -> torch.Tensor:
        """Packed forward: input_ids, positions [T] -> final-norm hidden states [T, H]."""
        attend = functools.partial(self._attend_packed, meta)
        linear = functools.partial(self.linear_backend.packed, meta=meta)
        hidden = self._embed(input_ids)
        rope = self._rope_tables(positions)
        kernels = self.layer_kernels
        for layer in self.layers:
            if layer.layer_type == LINEAR_ATTENTION:
                cos, sin, mix = None, None, linear
            else:
                (cos, sin), mix = rope[layer.layer_type], attend
            if activation_checkpointing and torch.is_grad_enabled():
                hidden = torch.utils.checkpoint.checkpoint(layer, hidden, cos, sin, mix, kernels, use_reentrant=False)
            else:
                hidden = layer(hidden, cos, sin, mix, kernels)
        return self.norm(hidden, kernels)

    def _attend_packed(self, meta, q, k, v, sliding_window):
        return self.backend.packed(q, k, v, meta, scale=self.config.attention_scale, sliding_window=sliding_window)

    @torch.no_grad()
    def forward_paged(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: PagedMetadata,
                      kv_cache: list[torch.Tensor]) -> torch.Tensor:
        """Prefill/decode step: writes the new tokens' K/V into kv_cache and returns their hidden states [T, H]."""
        if self.use_fused_decode_kernels:
            return self._forward_paged_fused(input_ids, positions, meta, kv_cache)
        hidden = self._embed(input_ids)
        rope = self._rope_tables(positions)
        for layer, layer_cache in zip(self.layers, kv_cache, strict=True):
            if layer.layer_type == LINEAR_ATTENTION:
                mix = functools.partial(self.linear_backend.paged, meta=meta, state=layer_cache)
                hidden = layer(hidden, None, None, mix)
                continue
            attend = functools.partial(self._attend_paged, meta, layer_cache)
            hidden = layer(hidden, *rope[layer.layer_type], attend)
        return self.norm(hidden)

    def _attend_paged(self, meta, layer_cache, q, k, v, sliding_window):
        return self.backend.paged(q, k, v, meta, layer_cache, scale=self.config.attention_scale,
                                  sliding_window=sliding_window)

    def _forward_paged_fused(self, input_ids, positions, meta, kv_cache):
        # Device copies of the inverse frequencies are made once (outside any CUDA graph capture).
        if positions.device not in self._inv_freq_by_device:
            self._inv_freq_by_device[positions.device] = {kind: inv_freq.to(positions.device)
                                                          for kind, inv_freq in self._inv_freq.items()}
        inv_freq = self._inv_freq_by_device[positions.device]
        pending, residual = self._embed(input_ids), None
        for layer, layer_cache in zip(self.layers, kv_cache, strict=True):
            attend = functools.partial(self._attend_cached, meta, layer_cache)
            pending, residual = layer.forward_fused(pending, residual, positions, inv_freq[layer.layer_type],
                                                    layer_cache, meta.slot_mapping, attend)
        return self.norm.forward_fused(pending, residual)[0]

    def stack_qkv(self, into: list | None = None) -> list:
        """Per layer, q/k/v projection weights stacked for the fused rollout forward (one matmul instead of three):
        new tensors, or the current weights copied in place into `into` (a list this returned before). L x (q + 2 kv)
        x H weights of memory, owned by the caller."""
        return [layer.self_attn.stack_qkv(None if into is None else into[index])
                for index, layer in enumerate(self.layers)]

    def install_fused_qkv(self, stacked: list | None) -> None:
        """Make forward_fused use these stacked projections (None: the three separate ones)."""
        for index, layer in enumerate(self.layers):
            layer.self_attn.fused_qkv = None if stacked is None else stacked[index]

    def pack_gate_up(self) -> None:
        """Put every layer's gate_proj and up_proj parameters back to back in one storage (GatedMLP.pack_gate_up),
        so the fused rollout forward runs them as one matmul with no copy. Same values, same parameter objects;
        call before an optimizer takes its fp32 masters (they alias fp32 parameters' storage)."""
        for layer in self.layers:
            layer.mlp.pack_gate_up()

    def install_fused_gate_up(self, on: bool) -> int:
        """Make forward_fused run gate/up as one projection in every layer whose parameters are packed (off: two);
        returns how many layers do."""
        for layer in self.layers:
            layer.mlp.fused_gate_up = layer.mlp.packed_gate_up() if on else None
        return sum(layer.mlp.fused_gate_up is not None for layer in self.layers)

    def _attend_cached(self, meta, layer_cache, q, sliding_window):
        return self.backend.paged(q, None, None, meta, layer_cache, scale=self.config.attention_scale,
                                  sliding_window=sliding_window, kv_written=True)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full logits [T, V] in float32; only for small uses (training never builds these)."""
        return hidden.float() @ self.lm_head_weight.float().T

    def allocate_kv_cache(self, num_pages: int, page_size: int, dtype: torch.dtype | None = None,
                          device: torch.device | str | None = None, num_state_slots: int = 0) -> list:
        """Per layer: a zeroed [2, num_pages, page_size, num_kv_heads, head_dim] tensor (attention_metadata.py), or
        for a linear-attention layer its LinearLayerState of num_state_slots sequence slots (conv windows in the
        cache dtype, delta-rule states in float32)."""
        dtype, device = dtype or self.dtype, device or self.device
        if self.config.has_linear_attention and num_state_slots < 1:
            raise ValueError("a model with linear-attention layers needs num_state_slots >= 1 (one per running "
                             "sequence)")
        shape = (2, num_pages, page_size, self.config.num_kv_heads, self.config.head_dim)
        return [LinearLayerState.allocate(num_state_slots, layer.linear_attn.dims, dtype, device)
                if layer.layer_type == LINEAR_ATTENTION else torch.zeros(shape, dtype=dtype, device=device)
                for layer in self.layers]

    @property
    def recurrent(self) -> bool:
        """Has linear-attention layers: rollout must give every sequence a state slot."""
        return self.config.has_linear_attention

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        element_bytes = torch.empty((), dtype=dtype or self.dtype).element_size()
        attention_layers = sum(layer.layer_type != LINEAR_ATTENTION for layer in self.layers)
        return attention_layers * 2 * self.config.num_kv_heads * self.config.head_dim * element_bytes

    def reset_parameters(self, seed: int, *, on_device: bool = False) -> None:
        """Seeded random init: normal(0, initializer_range) matrices and embeddings, zero biases, unit norms.

        Drawn on the CPU by default, so the same seed gives the same weights on any device. `on_device` draws with a
        generator on the model's device instead (same distribution, values depend on the device's RNG): minutes
        faster for billions of parameters on a GPU.
        """
        generator = torch.Generator(device=self.device if on_device else "cpu").manual_seed(seed)
        std = self.config.initializer_range
        for name, parameter in self.named_parameters():
            if isinstance(self.get_submodule(name.rsplit(".", 1)[0]), (RMSNorm, GatedRMSNorm)):
                continue
            with torch.no_grad():
                if name.endswith(".bias"):
                    parameter.zero_()
                elif on_device:
                    parameter.normal_(0.0, std, generator=generator)
                else:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
        for module in self.modules():
            if isinstance(module, (RMSNorm, GatedRMSNorm)):
                module.reset_parameters()
            elif isinstance(module, GatedDeltaNet):
                module.reset_recurrence(generator)

"""opdgraph.models: the one decoder (Qwen2/2.5, Qwen3, Llama 3.x, Gemma 3 text, Qwen3.5 dense text) used for
training, teacher scoring and rollout, with HF/GGUF loading, HF saving, layer pruning and tokenizers.

Module map: config (HF dict -> DecoderConfig), rope, norms and gated_activation (the training forward's autograd
Functions), layer_kernels (torch's or Liger-Kernel's norms, RoPE and activation), layers, attention_backend, decoder
(DecoderLM), checkpoint (safetensors IO, save_pretrained), gguf_checkpoint, tokenizers, loading (load_model),
pruning, packing; Qwen3.5's linear attention: gated_deltanet (the module), linear_attention_backend (its core),
delta_rule (the recurrence), linear_state (rollout's per-sequence state).
"""

from opdgraph.models.attention_backend import AttentionBackend, TorchReferenceBackend
from opdgraph.models.checkpoint import save_pretrained
from opdgraph.models.config import DecoderConfig
from opdgraph.models.decoder import DecoderLM
from opdgraph.models.errors import ModelLoadError
from opdgraph.models.loading import load_decoder, load_model
from opdgraph.models.pruning import prune_layers
from opdgraph.models.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer

__all__ = [
    "AttentionBackend", "ByteTokenizer", "DecoderConfig", "DecoderLM", "HFTokenizer", "ModelLoadError",
    "TorchReferenceBackend", "Tokenizer", "load_decoder", "load_model", "prune_layers", "save_pretrained",
]

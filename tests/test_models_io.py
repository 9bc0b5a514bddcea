"""Loading, saving, pruning and GGUF import: round trips through transformers and the gguf package.

What these protect: a saved student must load in transformers with identical logits; a pruned model must be a
consistent smaller model; a GGUF written the llama.cpp way (q/k rows permuted) must load back to the source weights.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import transformers
from transformers.convert_slow_tokenizer import bytes_to_unicode

from opdgraph.models import ByteTokenizer, load_decoder, load_model, prune_layers, save_pretrained
from opdgraph.models.checkpoint import hf_name
from opdgraph.models.packing import pack
from opdgraph.models.tiny_configs import TINY_CONFIGS, tiny_config

SEQUENCES = [[1, 5, 9, 200, 7, 3, 3, 8, 100, 42], [4, 4, 250]]


def our_logits(model, sequences=SEQUENCES) -> torch.Tensor:
    input_ids, positions, meta = pack(sequences)
    with torch.no_grad():
        return model.logits(model.forward_hidden(input_ids, positions, meta))


def transformers_logits(directory, sequences=SEQUENCES) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    with torch.no_grad():
        return torch.cat([model(torch.tensor([s])).logits[0] for s in sequences]).float()


def assert_same_state(model_a, model_b) -> None:
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_save_loads_in_transformers_with_identical_logits(family, tmp_path):
    """A saved model is not a valid HF checkpoint for its family (names, config keys, tying) or computes differently."""
    model, tokenizer = load_model(tiny_config(family), dtype=torch.float32, init_seed=4)
    save_pretrained(model, tmp_path, tokenizer)
    torch.testing.assert_close(transformers_logits(tmp_path), our_logits(model), rtol=1e-5, atol=1e-5)
    reloaded, reloaded_tokenizer = load_model(tmp_path, dtype=torch.float32)
    assert_same_state(reloaded, model)
    assert isinstance(reloaded_tokenizer, ByteTokenizer)


def test_random_init_is_seeded_and_scaled():
    """Inline-config init is not reproducible, ignores the seed, or has the wrong scale (initializer_range)."""
    config = tiny_config("qwen3")
    config["initializer_range"] = 0.05
    first = load_decoder(config, dtype=torch.float32, init_seed=0)
    assert_same_state(first, load_decoder(config, dtype=torch.float32, init_seed=0))
    other = load_decoder(config, dtype=torch.float32, init_seed=1)
    assert not torch.equal(first.embed_tokens.weight, other.embed_tokens.weight)
    assert abs(first.embed_tokens.weight.std().item() - 0.05) < 0.005
    assert torch.equal(first.layers[0].self_attn.q_norm.weight, torch.ones(24))


def test_bfloat16_model_saves_and_reloads():
    """bf16 weights change on a save/load round trip (silent cast) or the dtype is not recorded."""
    model, tokenizer = load_model(tiny_config("gemma3"), dtype=torch.bfloat16)
    assert all(parameter.dtype == torch.bfloat16 for parameter in model.parameters())
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        save_pretrained(model, directory, tokenizer)
        reloaded = load_decoder(directory, dtype=torch.bfloat16)
        assert reloaded.config.hf["dtype"] == "bfloat16"
    assert_same_state(reloaded, model)


@pytest.mark.parametrize("family,keep", [("gemma3", [0, 2]), ("llama", [2, 0]), ("qwen3", [1])])
def test_pruned_model_is_consistent_and_loads_in_transformers(family, keep, tmp_path):
    """Pruning keeps the wrong layers, shares tensors with the teacher, or leaves config (layer_types) stale."""
    teacher, tokenizer = load_model(tiny_config(family), dtype=torch.float32, init_seed=5)
    student = prune_layers(teacher, keep)
    assert student.config.num_layers == len(keep) == student.config.hf["num_hidden_layers"]
    assert student.config.layer_types == tuple(teacher.config.layer_types[i] for i in keep)
    for new, old in enumerate(keep):
        for name, tensor in student.layers[new].state_dict().items():
            assert torch.equal(tensor, teacher.layers[old].state_dict()[name])
    with torch.no_grad():
        student.embed_tokens.weight.add_(1.0)
    assert not torch.equal(student.embed_tokens.weight, teacher.embed_tokens.weight)
    save_pretrained(student, tmp_path, tokenizer)
    torch.testing.assert_close(transformers_logits(tmp_path), our_logits(student), rtol=1e-5, atol=1e-5)


def test_prune_rejects_bad_indices():
    """Out-of-range or repeated layer indices are accepted and produce a broken student."""
    model = load_decoder(tiny_config("qwen2"), dtype=torch.float32)
    for keep in ([], [3], [0, 0], [-1]):
        with pytest.raises(ValueError, match="keep_layers"):
            prune_layers(model, keep)


def test_kv_cache_layout_and_size():
    """The cache layout drifts from attention_metadata.py or kv_bytes_per_token disagrees with real allocations."""
    model = load_decoder(tiny_config("qwen3"), dtype=torch.bfloat16)
    cache = model.allocate_kv_cache(num_pages=5, page_size=4)
    assert len(cache) == 3 and cache[0].shape == (2, 5, 4, 2, 24) and cache[0].dtype == torch.bfloat16
    total_bytes = sum(layer.numel() * layer.element_size() for layer in cache)
    assert model.kv_bytes_per_token() * 5 * 4 == total_bytes
    assert model.kv_bytes_per_token(torch.float32) == 2 * model.kv_bytes_per_token()


# ---- GGUF -------------------------------------------------------------------------------------------------------

GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GGUF_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """The row reorder llama.cpp's converter applies to q/k (written independently of the loader under test)."""
    rows = weight.shape[0]
    head_dim = rows // num_heads
    order = [h * head_dim + (i // 2) + (i % 2) * (head_dim // 2) for h in range(num_heads) for i in range(head_dim)]
    return weight[order]


def write_tiny_gguf(path, hf_model, extra_tensor: str | None = None) -> None:
    config = hf_model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.head_dim)
    # A byte-level BPE vocabulary that transformers can turn into a tokenizer: bytes, specials, two merges (some
    # transformers versions read a one-entry GGUF array back as its single value, a string, not a list).
    byte_chars = bytes_to_unicode()
    tokens = [byte_chars[i] for i in range(256)] + ["<|endoftext|>", "<|bos|>", "<|pad|>", "\u0120t", "\u0120a"]
    tokens += [f"<|extra{i}|>" for i in range(config.vocab_size - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3, 3, 3, 1, 1] + [3] * (config.vocab_size - 261))
    writer.add_token_merges(["\u0120 t", "\u0120 a"])
    writer.add_bos_token_id(257)
    writer.add_eos_token_id(256)
    writer.add_pad_token_id(258)
    writer.add_chat_template("{% for m in messages %}<|bos|>{{ m['content'] }}<|endoftext|>{% endfor %}")
    for name, tensor in hf_model.state_dict().items():
        array = tensor.numpy().astype(np.float32)
        if name in GGUF_GLOBAL_NAMES:
            gguf_name = GGUF_GLOBAL_NAMES[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            gguf_name = f"blk.{layer}.{GGUF_LAYER_NAMES[rest]}"
        if "attn_q" in gguf_name:
            array = llama_cpp_permute(array, config.num_attention_heads)
        elif "attn_k" in gguf_name:
            array = llama_cpp_permute(array, config.num_key_value_heads)
        writer.add_tensor(gguf_name, np.ascontiguousarray(array))
    if extra_tensor:
        writer.add_tensor(extra_tensor, np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def tiny_llama_hf():
    config = tiny_config("llama")
    config.pop("rope_scaling")  # GGUF stores llama3 scaling as a rope_freqs tensor, which we reject
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config)).eval()


def test_gguf_loads_source_weights_and_tokenizer(tiny_llama_hf, tmp_path):
    """GGUF import scrambles q/k (permutation not undone), maps a tensor wrongly, or loses the tokenizer."""
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tiny_llama_hf)
    model, tokenizer = load_model(path, dtype=torch.float32)
    source = tiny_llama_hf.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, source[hf_name(name)]), name
    torch.testing.assert_close(
        our_logits(model),
        torch.cat([tiny_llama_hf(torch.tensor([s])).logits[0] for s in SEQUENCES]).detach(), rtol=1e-5, atol=1e-5)
    assert tokenizer.vocab_size == 300 and tokenizer.eos_token_ids == [256] and tokenizer.pad_token_id == 258
    assert tokenizer.decode(tokenizer.encode("h\u00e9 t")) == "h\u00e9 t"
    assert tokenizer.chat_ids([{"role": "user", "content": "ab"}], add_generation_prompt=False) == [257, 97, 98, 256]


def test_gguf_unknown_tensor_is_named(tiny_llama_hf, tmp_path):
    """A GGUF tensor we do not map is silently dropped instead of reported."""
    path = tmp_path / "extra.gguf"
    write_tiny_gguf(path, tiny_llama_hf, extra_tensor="blk.0.attn_q_norm.weight")
    with pytest.raises(ValueError, match=r"unexpected GGUF tensors.*blk\.0\.attn_q_norm\.weight"):
        load_decoder(path, dtype=torch.float32)


def test_hf_tokenizer_saves_with_model_and_reloads(tiny_llama_hf, tmp_path):
    """An HF tokenizer is lost on save, changes ids on reload, or generation_config eos ids are ignored."""
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tiny_llama_hf)
    model, tokenizer = load_model(path, dtype=torch.float32)
    directory = tmp_path / "saved"
    save_pretrained(model, directory, tokenizer)
    (directory / "generation_config.json").write_text('{"eos_token_id": [256, 259]}')
    reloaded_model, reloaded = load_model(directory, dtype=torch.float32)
    assert_same_state(reloaded_model, model)
    assert reloaded.name == tokenizer.name
    assert reloaded.encode("tat t") == tokenizer.encode("tat t")
    assert reloaded.eos_token_ids == [256, 259]

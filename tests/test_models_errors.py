"""Bad model inputs produce clear errors that name the file, tensor or config key (never a silent fallback)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from opdgraph.models import ByteTokenizer, ModelLoadError, load_decoder, load_model, save_pretrained
from opdgraph.models.tiny_configs import tiny_config


@pytest.fixture
def saved_qwen3(tmp_path):
    model, tokenizer = load_model(tiny_config("qwen3"), dtype=torch.float32)
    save_pretrained(model, tmp_path, tokenizer)
    return tmp_path


def rewrite_config(directory, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_missing_and_unexpected_tensors_are_listed(saved_qwen3):
    """A checkpoint lacking tensors loads with uninitialised weights, or stray tensors are silently ignored."""
    tensors = load_file(saved_qwen3 / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    del tensors["model.norm.weight"]
    tensors["model.layers.0.self_attn.rotary_scale"] = torch.zeros(2)
    save_file(tensors, saved_qwen3 / "model.safetensors")
    with pytest.raises(ModelLoadError) as error:
        load_decoder(saved_qwen3, dtype=torch.float32)
    message = str(error.value)
    assert "missing tensors: model.layers.1.mlp.up_proj.weight, model.norm.weight" in message
    assert "unexpected tensors: model.layers.0.self_attn.rotary_scale" in message


def test_shape_mismatch_names_tensor_and_shapes(saved_qwen3):
    """A config/weights disagreement surfaces as an obscure torch error instead of naming the tensor."""
    rewrite_config(saved_qwen3, intermediate_size=128)
    with pytest.raises(ModelLoadError, match=r"shape mismatch: model\.layers\.0\.mlp\.gate_proj\.weight: "
                                             r"checkpoint \(96, 64\), config expects \(128, 64\)"):
        load_decoder(saved_qwen3, dtype=torch.float32)


def test_unsupported_architecture_lists_supported_ones(saved_qwen3):
    """An unknown model_type/architecture is loaded as something else or fails without saying what is supported."""
    rewrite_config(saved_qwen3, model_type="mistral", architectures=["MistralForCausalLM"])
    with pytest.raises(ModelLoadError, match=r"unsupported architecture.*'mistral'.*Gemma3ForCausalLM, "
                                             r"LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        load_decoder(saved_qwen3, dtype=torch.float32)
    config = tiny_config("qwen2")
    config["architectures"] = ["Qwen2ForSequenceClassification"]
    with pytest.raises(ModelLoadError, match="unsupported architecture 'Qwen2ForSequenceClassification'"):
        load_decoder(config, dtype=torch.float32)


def test_missing_shard_and_corrupt_file(saved_qwen3):
    """A broken sharded checkpoint or a truncated file raises something that does not name the file."""
    tensors = load_file(saved_qwen3 / "model.safetensors")
    names = sorted(tensors)
    save_file({name: tensors[name] for name in names[:5]}, saved_qwen3 / "model-00001-of-00002.safetensors")
    save_file({name: tensors[name] for name in names[5:]}, saved_qwen3 / "model-00002-of-00002.safetensors")
    (saved_qwen3 / "model.safetensors").unlink()
    weight_map = {name: "model-00001-of-00002.safetensors" if i < 5 else "model-00002-of-00002.safetensors"
                  for i, name in enumerate(names)}
    (saved_qwen3 / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    load_decoder(saved_qwen3, dtype=torch.float32)  # the sharded checkpoint itself is fine

    payload = (saved_qwen3 / "model-00002-of-00002.safetensors").read_bytes()
    (saved_qwen3 / "model-00002-of-00002.safetensors").write_bytes(payload[: len(payload) // 2])
    with pytest.raises(ModelLoadError, match=r"model-00002-of-00002\.safetensors: cannot read safetensors file"):
        load_decoder(saved_qwen3, dtype=torch.float32)

    (saved_qwen3 / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"shard file\(s\) listed in weight_map are missing: "
                                             r"model-00002-of-00002\.safetensors"):
        load_decoder(saved_qwen3, dtype=torch.float32)


def test_missing_weights_and_tokenizer_files_are_reported(saved_qwen3, tmp_path_factory):
    """A directory without weights or without tokenizer files fails obscurely or falls back silently."""
    (saved_qwen3 / "opdgraph_byte_tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        load_model(saved_qwen3, dtype=torch.float32)
    (saved_qwen3 / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        load_decoder(saved_qwen3, dtype=torch.float32)
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_decoder(tmp_path_factory.mktemp("empty"), dtype=torch.float32)


@pytest.mark.parametrize("family,key,value,pattern", [
    ("gemma3", "attn_logit_softcapping", 50.0, "'attn_logit_softcapping' = 50.0 is not supported"),
    ("gemma3", "final_logit_softcapping", 30.0, "'final_logit_softcapping' = 30.0 is not supported"),
    ("gemma3", "use_bidirectional_attention", True, "'use_bidirectional_attention'"),
    ("llama", "rope_scaling", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
     "'rope_scaling.rope_type' = 'yarn' is not supported"),
    ("qwen3", "rope_scaling", {"rope_type": "dynamic", "factor": 2.0}, "'rope_scaling.rope_type' = 'dynamic'"),
    ("llama", "hidden_act", "gelu", "'hidden_act' = 'gelu' is not supported"),
    ("qwen2", "attention_dropout", 0.1, "'attention_dropout' = 0.1"),
    ("llama", "partial_rotary_factor", 0.5, "'partial_rotary_factor' = 0.5"),
])
def test_unsupported_config_options_are_rejected_by_key(family, key, value, pattern):
    """A config option the decoder does not implement is silently ignored and the model computes something else
    (the message names the key as the config spells it)."""
    config = tiny_config(family)
    config[key] = value
    with pytest.raises(ModelLoadError, match=pattern.replace("(", r"\(").replace(".", r"\.")):
        load_decoder(config, dtype=torch.float32)


@pytest.mark.parametrize("family,key,value", [
    ("llama", "attention_bias", True), ("llama", "mlp_bias", True), ("qwen3", "attention_bias", True),
    ("qwen2", "use_sliding_window", True),
])
def test_optional_biases_and_qwen_sliding_window_match_transformers(family, key, value, tmp_path):
    """Bias flags or Qwen's sliding window are accepted but not applied, so logits differ from transformers."""
    import transformers

    from opdgraph.models.packing import pack

    config = tiny_config(family)
    config[key] = value
    if key == "use_sliding_window":
        config.update(sliding_window=3, max_window_layers=1)
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config),
                                                            attn_implementation="eager").eval()
    with torch.no_grad():
        for parameter in hf_model.parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    hf_model.save_pretrained(tmp_path)
    ours = load_decoder(tmp_path, dtype=torch.float32)
    sequence = torch.randint(0, 300, (9,), generator=torch.Generator().manual_seed(0)).tolist()
    input_ids, positions, meta = pack([sequence])
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ours.forward_hidden(input_ids, positions, meta)),
                                   hf_model(torch.tensor([sequence])).logits[0], rtol=1e-5, atol=1e-5)


def test_byte_tokenizer_needs_room_in_vocab_and_round_trips_text():
    """The built-in tokenizer emits ids beyond the model's vocabulary, or loses bytes / chat structure."""
    config = tiny_config("qwen2")
    config["vocab_size"] = 200
    with pytest.raises(ModelLoadError, match="vocab_size=200 is too small for the built-in byte tokenizer"):
        load_model(config, dtype=torch.float32)
    tokenizer = ByteTokenizer(300)
    text = "h\u00e9llo \u2603"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    ids = tokenizer.chat_ids([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}])
    assert tokenizer.decode(ids) == "<|bos|><|system|>s<|end|><|user|>hi<|end|><|assistant|>"
    assert max(ids) < tokenizer.vocab_size <= 300
    assert set(tokenizer.eos_token_ids) == {tokenizer.special_ids["<|eos|>"], tokenizer.special_ids["<|end|>"]}
    with pytest.raises(ValueError, match="role 'tool'"):
        tokenizer.chat_ids([{"role": "tool", "content": "x"}])

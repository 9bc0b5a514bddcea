"""Model configs (inline, JSON file, model directory, GGUF header) are checked as strictly as the pipeline TOML, by
the one function `plan` and `run` share (opdgraph.model_config_check).

Each bad config must be rejected at plan time (ShapeError, or a ConfigError at the TOML line of `config`) and at
run time (ModelLoadError) with the same message, naming the file and the key. A failure means a typo'd or
impossible config trains a different model than asked, or passes `plan` and crashes inside torch or transformers.
"""

from __future__ import annotations

import json
import pathlib

import gguf
import numpy as np
import pytest
import torch

from opdgraph.config import ConfigError, load_pipeline
from opdgraph.errors import OpdgraphError
from opdgraph.model_config_check import ignored_keys
from opdgraph.model_shapes import ShapeError, shape_from_hf_config, shape_from_path
from opdgraph.models import ModelLoadError, load_decoder
from opdgraph.models.config import decoder_config_from_hf
from opdgraph.models.tiny_configs import tiny_config

TINY = pathlib.Path(__file__).parent.parent / "pipelines" / "tiny.toml"


def changed(family: str, drop: tuple[str, ...] = (), **changes) -> dict:
    config = tiny_config(family)
    for key in drop:
        del config[key]
    config.update(changes)
    return config


# (config, fragment of the message)
BAD_CONFIGS = {
    "typo num_key_value_head": (changed("llama", num_key_value_head=2),
                                "unknown key 'num_key_value_head' for model_type 'llama'; did you mean "
                                "'num_key_value_heads'?"),
    "typo tie_word_embedding": (changed("qwen2", tie_word_embedding=True), "did you mean 'tie_word_embeddings'?"),
    "typo max_position_embedding": (changed("qwen3", max_position_embedding=64),
                                    "did you mean 'max_position_embeddings'?"),
    "key of another family": (changed("gemma3", hidden_act="gelu_pytorch_tanh"),
                              "unknown key 'hidden_act' for model_type 'gemma3_text'; did you mean "
                              "'hidden_activation'?"),
    "qwen2 has no attention_bias": (changed("qwen2", attention_bias=True), "unknown key 'attention_bias'"),
    "string size": (changed("llama", hidden_size="64"), "'hidden_size' must be a positive integer, got a string "
                                                        "('64')"),
    "negative size": (changed("llama", hidden_size=-64), "'hidden_size' must be a positive integer, got an integer "
                                                         "(-64)"),
    "zero heads": (changed("llama", num_attention_heads=0), "'num_attention_heads' must be a positive integer"),
    "float vocab": (changed("qwen3", vocab_size=300.0), "'vocab_size' must be a positive integer, got a number"),
    "bool size": (changed("llama", num_hidden_layers=True), "'num_hidden_layers' must be a positive integer"),
    "string bool": (changed("llama", tie_word_embeddings="yes"), "'tie_word_embeddings' must be true or false"),
    "infinite eps": (changed("llama", rms_norm_eps=float("inf")), "'rms_norm_eps' must be a finite number > 0"),
    "zero rope theta": (changed("qwen2", rope_theta=0.0), "'rope_theta' must be a finite number > 0"),
    "heads not divisible by kv heads": (changed("llama", num_key_value_heads=3),
                                        "num_attention_heads (4) must be a multiple of num_key_value_heads (3)"),
    "absent kv heads take transformers' default": (changed("qwen2", drop=("num_key_value_heads",)),
                                                   "multiple of num_key_value_heads (32); the key is absent, so "
                                                   "this is transformers' qwen2 default: give it"),
    "hidden not divisible by heads": (changed("llama", hidden_size=66),
                                      "hidden_size (66) must be a multiple of num_attention_heads (4): head_dim is "
                                      "hidden_size // num_attention_heads"),
    "missing size": (changed("llama", drop=("vocab_size",)), "missing key 'vocab_size'"),
    "missing model_type": (changed("llama", drop=("model_type",)), "missing key 'model_type'"),
    "mistral": (changed("llama", model_type="mistral", architectures=["MistralForCausalLM"]),
                "model_type 'mistral', architectures ['MistralForCausalLM']): Mistral is not supported"),
    "multimodal gemma3": ({"model_type": "gemma3", "text_config": tiny_config("gemma3")},
                          "the multimodal Gemma 3 (Gemma3ForConditionalGeneration) is not supported"),
    "wrong architecture": (changed("qwen2", architectures=["Qwen2ForSequenceClassification"]),
                           "unsupported architecture 'Qwen2ForSequenceClassification' for model_type 'qwen2'"),
    "quantized": (changed("llama", quantization_config={"quant_method": "gptq"}), "quantized HF checkpoints"),
    "llama3 rope without its factors": (changed("llama", rope_scaling={"rope_type": "llama3", "factor": 8.0}),
                                        "rope_type 'llama3' needs low_freq_factor, high_freq_factor"),
    "rope key typo": (changed("qwen3", rope_parameters={"rope_type": "default", "rope_thetaa": 1e6}),
                      "unknown key 'rope_parameters.rope_thetaa' for rope_type 'default'; did you mean 'rope_theta'?"),
    "rope factor typo": (changed("llama", rope_scaling={"rope_type": "linear", "facter": 2.0}),
                         "unknown key 'rope_scaling.facter' for rope_type 'linear'; did you mean 'factor'?"),
    "llama3 key in a linear rope": (changed("llama", rope_scaling={"type": "linear", "factor": 2.0,
                                                                   "low_freq_factor": 1.0}),
                                    "unknown key 'rope_scaling.low_freq_factor' for rope_type 'linear' (a key of "
                                    "rope_type 'llama3'"),
    "factor in a default rope": (changed("qwen2", rope_scaling={"rope_type": "default", "factor": 4.0}),
                                 "unknown key 'rope_scaling.factor' for rope_type 'default' (a key of rope_type "
                                 "'linear' / 'llama3'"),
    "string rope factor": (changed("llama", rope_scaling={"rope_type": "linear", "factor": "2"}),
                           "'rope_scaling.factor' must be a finite number > 0, got a string ('2')"),
    "zero rope factor": (changed("llama", rope_scaling={"rope_type": "linear", "factor": 0.0}),
                         "'rope_scaling.factor' must be a finite number > 0, got a number (0.0)"),
    "negative rope theta inside": (changed("llama", rope_parameters={"rope_type": "default", "rope_theta": -1.0}),
                                   "'rope_parameters.rope_theta' must be a finite number > 0"),
    "float original positions": (changed("llama", rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                                "original_max_position_embeddings": 64.0}),
                                 "'rope_scaling.original_max_position_embeddings' must be a positive integer"),
    "llama3 band upside down": (changed("llama", rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                               "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                                                               "original_max_position_embeddings": 32}),
                                "'rope_scaling.high_freq_factor' (1.0) must be greater than low_freq_factor (4.0)"),
    "two rope types": (changed("llama", rope_scaling={"rope_type": "linear", "type": "llama3", "factor": 2.0}),
                       "'rope_scaling' names two rope types (rope_type 'linear', type 'llama3')"),
    "unsupported rope type": (changed("llama", rope_scaling={"rope_type": "yarn", "factor": 2.0}),
                              "config key 'rope_scaling.rope_type' = 'yarn' is not supported"),
    "gemma per-layer rope key typo": (changed("gemma3", rope_parameters={
                                          "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                          "sliding_attention": {"rope_type": "default", "rope_thet": 1e4}}),
                                      "unknown key 'rope_parameters.sliding_attention.rope_thet' for rope_type "
                                      "'default'; did you mean 'rope_theta'?"),
    "gemma per-layer rope layer typo": (changed("gemma3", rope_parameters={
                                            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                            "sliding_attentoin": {"rope_type": "default", "rope_theta": 1e4}}),
                                        "unknown key 'rope_parameters.sliding_attentoin': a per-layer-type RoPE "
                                        "object is keyed by 'full_attention' / 'sliding_attention'; did you mean "
                                        "'sliding_attention'?"),
    "layer_types of the wrong length": (changed("gemma3", layer_types=["full_attention"]),
                                        "'layer_types' needs one entry per layer (num_hidden_layers = 3), got 1"),
    "sliding layers without a window": (changed("qwen3", layer_types=["sliding_attention"] * 3),
                                        "sliding layers, which need a positive sliding_window and "
                                        "use_sliding_window = true"),
    "a list, not an object": ([tiny_config("llama")], "a model config must be an object of HF config keys, got a "
                                                      "list"),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_plan_and_run_reject_with_the_same_message(name):
    """If this fails, the config is accepted at plan or at run time (or they disagree on why it is wrong)."""
    config, fragment = BAD_CONFIGS[name]
    with pytest.raises(ShapeError) as at_plan:
        shape_from_hf_config(config, "m.json")
    with pytest.raises(ModelLoadError) as at_run:
        decoder_config_from_hf(config, "m.json")
    assert str(at_plan.value) == str(at_run.value)
    assert str(at_plan.value).startswith("m.json: ") and fragment in str(at_plan.value)
    assert isinstance(at_plan.value, OpdgraphError) and isinstance(at_run.value, OpdgraphError)


def test_every_problem_of_a_config_is_reported_at_once():
    """If this fails, a user fixing a model config learns its problems one run at a time."""
    with pytest.raises(ShapeError) as caught:
        shape_from_hf_config(changed("llama", hidden_size="64", num_key_value_head=2, rms_norm_eps=-1.0), "m.json")
    message = str(caught.value)
    assert message.startswith("m.json: 3 problems:")
    assert "'hidden_size'" in message and "'num_key_value_head'" in message and "'rms_norm_eps'" in message


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen2_untied", "qwen3", "gemma3"])
def test_valid_configs_and_ignored_keys_are_accepted(family):
    """If this fails, the strict check rejects a real config shape, or the HF metadata keys every config.json
    carries (accepted, changing nothing) are no longer listed as ignored."""
    config = changed(family, torch_dtype="bfloat16", use_cache=True, transformers_version="4.51.0")
    assert shape_from_hf_config(config).family == decoder_config_from_hf(config).family
    assert {"torch_dtype", "use_cache", "transformers_version", "bos_token_id"} <= set(ignored_keys(config))
    assert "hidden_size" not in ignored_keys(config)


GOOD_ROPES = {  # rope dicts as real config.json files write them (Llama 2 / 3.1, Gemma 3, transformers 5)
    "llama2 linear, old `type` key": ("llama", "rope_scaling", {"type": "linear", "factor": 2.0}),
    "llama 3.1": ("llama", "rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "both type keys, agreeing": ("llama", "rope_scaling", {"rope_type": "linear", "type": "linear", "factor": 2.0}),
    "transformers 5 rope_parameters": ("qwen3", "rope_parameters", {"rope_type": "default", "rope_theta": 1e6,
                                                                     "partial_rotary_factor": 1.0}),
    "gemma3 per layer type": ("gemma3", "rope_parameters", {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
}


@pytest.mark.parametrize("name", list(GOOD_ROPES))
def test_real_rope_dicts_are_accepted(name):
    """If this fails, the per-type RoPE key check rejects a RoPE dict that real checkpoints carry (and transformers
    and the runtime build)."""
    family, key, rope = GOOD_ROPES[name]
    config = changed(family, **{key: rope})
    assert shape_from_hf_config(config).family == decoder_config_from_hf(config).family


def test_qwen3_head_dim_need_not_divide_hidden():
    """If this fails, a Qwen3 config whose head_dim is given (and hidden_size is not heads x head_dim) is rejected
    though transformers and the runtime build it."""
    config = changed("qwen3", hidden_size=66)
    assert shape_from_hf_config(config).head_dim == decoder_config_from_hf(config).head_dim == 24


def write(path: pathlib.Path, data: bytes) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


FILE_CASES = {  # config.json bytes -> fragment of the message (which names the file)
    "typo": (json.dumps(changed("llama", tie_word_embedding=False)).encode(), "did you mean 'tie_word_embeddings'?"),
    "list": (json.dumps([tiny_config("llama")]).encode(), "a model config must be a JSON object"),
    "non-UTF-8": (b'{"model_type": "llama",\n "x": "\xff\xfe"}', ":2: not UTF-8 text (byte 0xff at offset 31)"),
    "bad JSON": (b'{"model_type": "llama",\n}', ":2: not valid JSON"),
}


@pytest.mark.parametrize("name", list(FILE_CASES))
def test_config_files_are_checked_at_plan_and_run_time(tmp_path, name):
    """If this fails, a bad config.json passes `plan`, or reaches the user as a UnicodeDecodeError / JSONDecodeError
    / AttributeError traceback at run time instead of an error naming the file."""
    data, fragment = FILE_CASES[name]
    config_file = write(tmp_path / "model" / "config.json", data)
    with pytest.raises(ShapeError, match=str(config_file)) as at_plan:
        shape_from_path(str(tmp_path / "model"), str(tmp_path))
    with pytest.raises(ModelLoadError, match=str(config_file)) as at_run:
        load_decoder(tmp_path / "model", dtype=torch.float32)
    assert fragment in str(at_plan.value) and fragment in str(at_run.value)


def test_inline_config_problem_names_the_toml_line_and_key(tmp_path):
    """If this fails, a typo in an inline `config = {...}` is ignored (a different model trains), or is reported
    without the pipeline file's line."""
    text = TINY.read_text().replace("num_key_value_heads = 2, vocab_size = 384, max_position_embeddings = 512, "
                                    "tie_word_embeddings = true",
                                    "num_key_value_heads = 2, vocab_size = 384, max_position_embedding = 512, "
                                    "tie_word_embeddings = true")
    line = next(number for number, row in enumerate(text.splitlines(), 1) if "max_position_embedding =" in row)
    (tmp_path / "tiny.toml").write_text(text)
    (tmp_path / "data").symlink_to(TINY.parent / "data")
    with pytest.raises(ConfigError) as caught:
        load_pipeline(str(tmp_path / "tiny.toml"))
    [problem] = caught.value.problems
    assert problem.location == f"tiny.toml:{line}"
    assert problem.path == "models.student.config.max_position_embedding"
    assert "did you mean 'max_position_embeddings'?" in problem.message


def test_non_utf8_pipeline_file_is_a_config_error_with_its_line(tmp_path):
    """If this fails, a pipeline TOML with a stray Latin-1 byte crashes with UnicodeDecodeError."""
    data = TINY.read_bytes().replace(b'name = "tiny"', b'name = "tiny\xe9"')
    line = data[:data.index(b"\xe9")].count(b"\n") + 1
    write(tmp_path / "tiny.toml", data)
    with pytest.raises(ConfigError) as caught:
        load_pipeline(str(tmp_path / "tiny.toml"))
    assert str(caught.value).startswith(f"tiny.toml:{line}  <file>: not UTF-8 text (byte 0xe9")


def header_only_gguf(path: pathlib.Path, architecture: str, heads: int = 4) -> pathlib.Path:
    """A GGUF with a real header and one tiny embedding tensor (enough for the header checks)."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(heads)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tensor("token_embd.weight", np.zeros((300, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("case, fragment", [
    ("garbage", "not a readable GGUF file"), ("empty", "not a readable GGUF file"),
    ("qwen2", "unsupported GGUF architecture 'qwen2'"), ("zero heads", "'num_attention_heads' must be a positive"),
])
def test_bad_gguf_is_rejected_at_plan_and_run_time(tmp_path, case, fragment):
    """If this fails, a garbage .gguf crashes inside the gguf package, or `plan` accepts a GGUF (another
    architecture, an impossible header) that the loader then rejects."""
    path = tmp_path / "m.gguf"
    if case == "garbage":
        write(path, b"GGUF" + bytes(range(256)) * 4)
    elif case == "empty":
        write(path, b"")
    else:
        header_only_gguf(path, "qwen2" if case == "qwen2" else "llama", heads=0 if case == "zero heads" else 4)
    with pytest.raises(ShapeError, match=str(path)) as at_plan:
        shape_from_path("m.gguf", str(tmp_path))
    with pytest.raises(ModelLoadError, match=str(path)) as at_run:
        load_decoder(path, dtype=torch.float32)
    assert fragment in str(at_plan.value) and fragment in str(at_run.value)


def test_gguf_header_shape_is_the_loaders_config(tmp_path):
    """If this fails, `plan` reads another shape from a GGUF header than the loader builds from it."""
    path = header_only_gguf(tmp_path / "m.gguf", "llama")
    shape = shape_from_path("m.gguf", str(tmp_path))
    assert (shape.family, shape.vocab, shape.heads, shape.kv_heads, shape.head_dim, shape.tied) == (
        "llama", 300, 4, 2, 2, True)

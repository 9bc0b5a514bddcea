"""The one strict check of an HF-style model config, shared by `plan` (model_shapes) and `run` (models.config).

A model config (an inline `config = {...}`, a config .json, a model directory's config.json, or the dict built from
a GGUF header) is checked as strictly as the pipeline TOML: every key must be one the family's configs hold
(opdgraph.families; a typo gets "did you mean"), every value read must have the right type and range (sizes are
positive integers, epsilons positive finite numbers, ...), the shape must be buildable (heads a multiple of the
key/value heads, hidden size a multiple of the heads where transformers needs it), and every option the decoder does
not implement is rejected by key. `config_problems` returns (family, [(key, message), ...]) so the TOML loader can
place each problem on its line; `check_model_config` raises the caller's error (ShapeError at plan time,
ModelLoadError at run time) listing all of them. Torch-free and transformers-free.
"""

from __future__ import annotations

import difflib
import json
import math

from opdgraph.families import (FAMILIES, FULL_ATTENTION, IGNORED_KEYS, LINEAR_ATTENTION, MULTIMODAL_WRAPPERS,
                               REJECTED_MODEL_TYPES, SLIDING_ATTENTION, SUPPORTED_ACTIVATIONS, SUPPORTED_ARCHITECTURES,
                               SUPPORTED_ROPE_TYPES, Family)

REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
UNSUPPORTED_KEYS = {"quantization_config": "quantized HF checkpoints are not supported; use the unquantised weights "
                                           "(or a GGUF file, which is dequantised on load)"}


def _shown(value) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object", type(None): "null"}
    kind = kinds.get(type(value), type(value).__name__)
    return kind if isinstance(value, (list, dict)) or value is None else f"{kind} ({value!r})"


def _is_int(value) -> bool:
    return type(value) is int


def _is_number(value) -> bool:
    return type(value) in (int, float)


def _size(key, value):
    if not _is_int(value) or value < 1:
        return f"{key!r} must be a positive integer, got {_shown(value)}"


def _count(key, value):
    if not _is_int(value) or value < 0:
        return f"{key!r} must be an integer >= 0, got {_shown(value)}"


def _positive(key, value):
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        return f"{key!r} must be a finite number > 0, got {_shown(value)}"


def _non_negative(key, value):
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        return f"{key!r} must be a finite number >= 0, got {_shown(value)}"


def _bool(key, value):
    if type(value) is not bool:
        return f"{key!r} must be true or false, got {_shown(value)}"


def _architectures(key, value):
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        return f"{key!r} must be a list of class names, got {_shown(value)}"


def _unsupported(key, value, why: str) -> str:
    return f"config key {key!r} = {value!r} is not supported: {why}"


def _activation(key, value):
    if type(value) is not str or value not in SUPPORTED_ACTIVATIONS:
        return _unsupported(key, value, f"supported activations are {', '.join(SUPPORTED_ACTIVATIONS)}")


def _no_dropout(key, value):
    if not _is_number(value) or value != 0:
        return _unsupported(key, value, "dropout is not implemented (set it to 0.0)")


def _no_softcapping(key, value):
    if value is not None:
        return _unsupported(key, value, "logit softcapping is not implemented (the loss applies lm_head outside "
                                        "the model)")


def _causal(key, value):
    if value not in (None, False):
        return _unsupported(key, value, "only causal attention is implemented")


def _full_rotary(key, value):
    if not _is_number(value) or value != 1:
        return _unsupported(key, value, "only full rotary dims are supported")


def _layer_types(key, value, valid=(FULL_ATTENTION, SLIDING_ATTENTION)):
    if value is None:
        return None
    if not isinstance(value, list) or not all(item in valid for item in value):
        return f"{key!r} must be a list of {valid[0]!r} / {valid[1]!r} (one per layer), got {_shown(value)}"


def _rotary_fraction(key, value):
    if not _is_number(value) or not 0 < value <= 1:
        return f"{key!r} must be a number in (0, 1] (the part of head_dim RoPE rotates), got {_shown(value)}"


def _output_gate(key, value):
    if value is not True:
        return _unsupported(key, value, "transformers' Qwen3.5 attention always gates its output (q_proj yields the "
                                        "gate); only true is implemented")


def _dense(key, value):
    if value != []:
        return _unsupported(key, value, "layers without a token mixer are a Qwen3.5 MoE option; a dense model has []")


def _mrope_section(key, value):
    if not isinstance(value, list) or not all(_is_int(item) and item >= 0 for item in value):
        return f"{key!r} must be a list of integers >= 0, got {_shown(value)}"


def _optional(check):
    return lambda key, value: None if value is None else check(key, value)


ROPE_VALUES = {"rope_theta": _positive, "factor": _positive, "low_freq_factor": _positive,
               "high_freq_factor": _positive, "original_max_position_embeddings": _size,
               "partial_rotary_factor": _full_rotary}
# Per rope type: (keys it needs, keys it may also hold), as transformers' rope validation reads them
# (modeling_rope_utils); any type may name itself (rope_type, or the older `type`) and give partial_rotary_factor.
# transformers only warns about other keys and then ignores them, so a typo'd factor would train with a default.
ROPE_KEYS = {"default": ((), ("rope_theta",)), "linear": (("factor",), ("rope_theta",)),
             "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                        ("rope_theta",))}
ROPE_ANY_TYPE = ("rope_type", "type", "partial_rotary_factor")
LAYER_TYPES = (FULL_ATTENTION, SLIDING_ATTENTION)


def _rope(key, value, hybrid: bool = False):
    """rope_scaling / rope_parameters: null, one RoPE dict, or (Gemma 3) one dict per layer type. hybrid (Qwen3.5):
    a partial rotary factor, and the multimodal RoPE's sections, which text-only positions (the same position for
    time, height and width) reduce to plain RoPE, so they change nothing for a text model."""
    if value is None:
        return None
    if not isinstance(value, dict):
        return f"{key!r} must be an object (or null), got {_shown(value)}"
    if any(name in LAYER_TYPES or isinstance(inner, dict) for name, inner in value.items()):
        messages = [_rope(f"{key}.{name}", inner, hybrid) if name in LAYER_TYPES else
                    f"unknown key '{key}.{name}': a per-layer-type RoPE object is keyed by "
                    f"{' / '.join(map(repr, LAYER_TYPES))}{_close(name, LAYER_TYPES)}" for name, inner in value.items()]
        return "; ".join(filter(None, messages)) or None
    return _rope_object(key, value, hybrid)


MROPE_KEYS = {"mrope_section": _mrope_section, "mrope_interleaved": _bool}


def _rope_object(key: str, value: dict, hybrid: bool = False):
    if "rope_type" in value and "type" in value and value["rope_type"] != value["type"]:
        return (f"{key!r} names two rope types (rope_type {value['rope_type']!r}, type {value['type']!r}); "
                f"keep rope_type")
    type_key = "rope_type" if "rope_type" in value or "type" not in value else "type"
    rope_type = value.get(type_key, "default")
    if type(rope_type) is not str or rope_type not in SUPPORTED_ROPE_TYPES:
        return _unsupported(f"{key}.{type_key}", rope_type,
                            f"supported rope types are {', '.join(SUPPORTED_ROPE_TYPES)}")
    needs, optional = ROPE_KEYS[rope_type]
    allowed = (*ROPE_ANY_TYPE, *needs, *optional, *(MROPE_KEYS if hybrid else ()))
    checks = {**ROPE_VALUES, **MROPE_KEYS, "partial_rotary_factor": _rotary_fraction} if hybrid else ROPE_VALUES
    messages = []
    for name, inner in value.items():
        if name in allowed:
            messages.append(checks[name](f"{key}.{name}", inner) if name in checks else None)
            continue
        owners = [other for other, keys in ROPE_KEYS.items() if name in keys[0] + keys[1]]
        hint = (f" (a key of rope_type {' / '.join(map(repr, owners))}, which this object is not; it would be "
                f"ignored)"
                if owners else _close(name, allowed) or f" (rope_type {rope_type!r} takes {', '.join(allowed)})")
        messages.append(f"unknown key '{key}.{name}' for rope_type {rope_type!r}{hint}")
    missing = [name for name in needs if name not in value]
    if missing:
        messages.append(f"{key!r}: rope_type {rope_type!r} needs {', '.join(missing)}")
    low, high = value.get("low_freq_factor"), value.get("high_freq_factor")
    if rope_type == "llama3" and _is_number(low) and _is_number(high) and high <= low:
        messages.append(f"'{key}.high_freq_factor' ({high}) must be greater than low_freq_factor ({low}): llama3 "
                        f"RoPE blends over the band between them")
    return "; ".join(filter(None, messages)) or None


VALUE_CHECKS = {
    "vocab_size": _size, "hidden_size": _size, "intermediate_size": _size, "num_hidden_layers": _size,
    "num_attention_heads": _size, "num_key_value_heads": _size, "head_dim": _size, "max_position_embeddings": _size,
    "sliding_window": _optional(_size), "sliding_window_pattern": _size, "_sliding_window_pattern": _size,
    "max_window_layers": _count, "rms_norm_eps": _positive, "rope_theta": _positive, "rope_local_base_freq": _positive,
    "query_pre_attn_scalar": _positive, "initializer_range": _non_negative, "tie_word_embeddings": _bool,
    "attention_bias": _bool, "mlp_bias": _bool, "use_sliding_window": _bool, "architectures": _architectures,
    "hidden_act": _activation, "hidden_activation": _activation, "attention_dropout": _no_dropout,
    "attn_logit_softcapping": _no_softcapping, "final_logit_softcapping": _no_softcapping,
    "use_bidirectional_attention": _causal, "partial_rotary_factor": _full_rotary, "layer_types": _layer_types,
    "rope_scaling": _rope, "rope_parameters": _rope,
    "linear_conv_kernel_dim": _size, "linear_key_head_dim": _size, "linear_value_head_dim": _size,
    "linear_num_key_heads": _size, "linear_num_value_heads": _size, "full_attention_interval": _size,
    "attn_output_gate": _output_gate, "mlp_only_layers": _dense,
}
# What differs for a hybrid family (Qwen3.5): its layer kinds, a partial rotary factor, the multimodal RoPE keys.
HYBRID_VALUE_CHECKS = {
    "layer_types": lambda key, value: _layer_types(key, value, (LINEAR_ATTENTION, FULL_ATTENTION)),
    "partial_rotary_factor": _rotary_fraction,
    "rope_scaling": lambda key, value: _rope(key, value, hybrid=True),
    "rope_parameters": lambda key, value: _rope(key, value, hybrid=True),
}


def _close(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _family(config) -> tuple[Family | None, list[tuple[str, str]]]:
    supported = ", ".join(sorted(FAMILIES))
    if not isinstance(config, dict):
        return None, [("", f"a model config must be an object of HF config keys, got {_shown(config)}")]
    model_type = config.get("model_type")
    if model_type is None:
        return None, [("model_type", f"missing key 'model_type' (one of {supported})")]
    if type(model_type) is not str:
        return None, [("model_type", f"'model_type' must be a string, got {_shown(model_type)}")]
    family = FAMILIES.get(model_type)
    if family is None:
        why = REJECTED_MODEL_TYPES.get(model_type, "not one of the supported families" + _close(model_type, FAMILIES))
        return None, [("model_type", f"unsupported architecture (model_type {model_type!r}, architectures "
                                     f"{config.get('architectures')!r}): {why}; supported: "
                                     f"{', '.join(SUPPORTED_ARCHITECTURES)} (model_type one of {supported})")]
    architectures = config.get("architectures")
    for architecture in architectures if isinstance(architectures, list) else []:
        if architecture != family.architecture:
            return family, [("architectures", f"unsupported architecture {architecture!r} for model_type "
                                              f"{model_type!r} (expected {family.architecture!r})")]
    return family, []


def _wrapper_problems(config: dict) -> tuple[Family | None, list[tuple[str, str]]]:
    """A multimodal checkpoint's config (MULTIMODAL_WRAPPERS): its own keys, then its text config's, prefixed."""
    wrapper = MULTIMODAL_WRAPPERS[config["model_type"]]
    problems = [(key, f"unknown key {key!r} for model_type {wrapper.model_type!r}"
                      f"{_close(key, wrapper.keys) or ' (no close match among its keys)'}")
                for key in config if key not in wrapper.keys]
    for architecture in config.get("architectures") or []:
        if architecture != wrapper.architecture:
            problems.append(("architectures", f"unsupported architecture {architecture!r} for model_type "
                                              f"{wrapper.model_type!r} (expected {wrapper.architecture!r})"))
    if "tie_word_embeddings" in config and _bool("tie_word_embeddings", config["tie_word_embeddings"]):
        problems.append(("tie_word_embeddings", _bool("tie_word_embeddings", config["tie_word_embeddings"])))
    text = config.get(wrapper.text_key)
    if not isinstance(text, dict):
        return FAMILIES[wrapper.text_model_type], problems + [
            (wrapper.text_key, f"a {wrapper.model_type} config needs its text model's config as an object "
                               f"{wrapper.text_key!r}, got {_shown(text)}")]
    if text.get("model_type", wrapper.text_model_type) != wrapper.text_model_type:
        problems.append((f"{wrapper.text_key}.model_type", f"the text config of a {wrapper.model_type} config has "
                                                           f"model_type {wrapper.text_model_type!r}, got "
                                                           f"{text['model_type']!r}"))
        return FAMILIES[wrapper.text_model_type], problems
    family, inner = config_problems(text_part(config))
    return family, problems + [(f"{wrapper.text_key}.{key}" if key else wrapper.text_key, message)
                               for key, message in inner]


def text_part(config: dict) -> dict:
    """The config of the model we build: the config itself, or a multimodal checkpoint's text config as a causal
    LM config of its own (model_type and architecture of the text family; the outer tie_word_embeddings wins, as
    transformers ties by the outer config). The vision config is dropped: the vision tower is never built."""
    wrapper = MULTIMODAL_WRAPPERS.get(config.get("model_type")) if isinstance(config, dict) else None
    if wrapper is None:
        return config
    text = dict(config[wrapper.text_key])
    text["model_type"] = wrapper.text_model_type
    text["architectures"] = [FAMILIES[wrapper.text_model_type].architecture]
    if "tie_word_embeddings" in config:
        text["tie_word_embeddings"] = config["tie_word_embeddings"]
    return text


def multimodal_wrapper(config: dict):
    """The MultimodalWrapper a config is of, or None."""
    return MULTIMODAL_WRAPPERS.get(config.get("model_type")) if isinstance(config, dict) else None


def config_problems(config) -> tuple[Family | None, list[tuple[str, str]]]:
    """(family or None, [(key, message), ...]) for an HF-style config dict; no problems means plan and run can
    build it. A multimodal checkpoint's config is checked as its text model's (text_part)."""
    if isinstance(config, dict) and isinstance(config.get("model_type"), str) and config["model_type"] in MULTIMODAL_WRAPPERS:
        return _wrapper_problems(config)
    family, problems = _family(config)
    if family is None or problems:
        return family, problems
    for key, value in config.items():
        if key in UNSUPPORTED_KEYS:
            problems.append((key, f"config key {key!r}: {UNSUPPORTED_KEYS[key]}"))
        elif key not in family.keys:
            problems.append((key, f"unknown key {key!r} for model_type {family.model_type!r}"
                                  f"{_close(key, family.keys) or ' (no close match among its keys)'}"))
        elif value is None and key in family.nullable:
            continue
        elif key in VALUE_CHECKS:
            checks = HYBRID_VALUE_CHECKS if family.linear_attention else {}
            message = checks.get(key, VALUE_CHECKS[key])(key, value)
            if message:
                problems.append((key, message))
    problems += [(key, f"missing key {key!r} (a {family.model_type} config needs {', '.join(REQUIRED_KEYS)})")
                 for key in REQUIRED_KEYS if key not in config]
    if not problems:
        problems = _shape_problems(family, config)
    return family, problems


def _shape_problems(family: Family, config: dict) -> list[tuple[str, str]]:
    problems = []
    heads, hidden, layers = config["num_attention_heads"], config["hidden_size"], config["num_hidden_layers"]
    kv_heads = family.default("num_key_value_heads", config)
    if heads % kv_heads:
        given = "" if "num_key_value_heads" in config else (f"; the key is absent, so this is transformers' "
                                                              f"{family.model_type} default: give it")
        problems.append(("num_key_value_heads", f"num_attention_heads ({heads}) must be a multiple of "
                                                f"num_key_value_heads ({kv_heads}){given}"))
    derived_head_dim = config.get("head_dim") is None and family.defaults.get("head_dim") == "derived"
    if hidden % heads and (derived_head_dim or family.hidden_divisible_by_heads):
        why = "head_dim is hidden_size // num_attention_heads" if derived_head_dim else (
            f"transformers' {family.model_type} config requires it")
        problems.append(("hidden_size", f"hidden_size ({hidden}) must be a multiple of num_attention_heads "
                                        f"({heads}): {why}"))
    if family.linear_attention:
        key_heads = family.default("linear_num_key_heads", config)
        value_heads = family.default("linear_num_value_heads", config)
        if value_heads % key_heads:
            problems.append(("linear_num_value_heads", f"linear_num_value_heads ({value_heads}) must be a multiple of "
                                                       f"linear_num_key_heads ({key_heads}): each key head serves a "
                                                       f"group of value heads"))
        rotary = int(family.default("head_dim", config) * family.rotary_fraction(config))
        if rotary % 2:
            problems.append(("partial_rotary_factor", f"head_dim x partial_rotary_factor = {rotary} rotated dims must "
                                                      f"be even (RoPE rotates pairs)"))
    layer_types = config.get("layer_types")
    if layer_types is not None and len(layer_types) != layers:
        problems.append(("layer_types", f"'layer_types' needs one entry per layer (num_hidden_layers = {layers}), "
                                        f"got {len(layer_types)}"))
    if layer_types and SLIDING_ATTENTION in layer_types:
        window = family.default("sliding_window", config) if family.sliding_windows != "none" else None
        if family.sliding_windows == "max_window_layers" and not config.get("use_sliding_window"):
            window = None  # transformers drops the window of a Qwen config without use_sliding_window
        if not window:
            problems.append(("sliding_window", "layer_types has sliding layers, which need a positive "
                                               "sliding_window" + (" and use_sliding_window = true"
                                                                   if family.sliding_windows == "max_window_layers"
                                                                   else "")))
    return problems


def ignored_keys(config: dict) -> list[str]:
    """The keys of a checked config that are accepted but change nothing (families.IGNORED_KEYS, and the family's
    own, such as Qwen3.5's multi-token-prediction keys)."""
    family = FAMILIES.get(config.get("model_type"))
    ignored = IGNORED_KEYS | (family.ignored if family is not None else frozenset())
    return sorted(key for key in config if key in ignored)


def describe_problems(source: str, problems: list[tuple[str, str]]) -> str:
    if len(problems) == 1:
        return f"{source}: {problems[0][1]}"
    return f"{source}: {len(problems)} problems:\n" + "\n".join(f"  {message}" for _, message in problems)


def check_model_config(config, source: str, error: type[Exception]) -> Family:
    """The config's family; raises `error` naming `source` and every problem when the config cannot be built."""
    family, problems = config_problems(config)
    if problems:
        raise error(describe_problems(source, problems))
    return family


def read_config_file(path: str, error: type[Exception]) -> dict:
    """A config .json file as a dict; raises `error` naming the file for unreadable bytes, bad JSON, or a top level
    that is not an object."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as problem:
        raise error(f"{path}: cannot read the model config ({problem.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as problem:
        line = data[:problem.start].count(b"\n") + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte {data[problem.start]:#04x} at offset {problem.start}); "
                    f"save the config as UTF-8") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as problem:
        raise error(f"{path}:{problem.lineno}: not valid JSON ({problem.msg}, column {problem.colno})") from None
    if not isinstance(config, dict):
        raise error(f"{path}: a model config must be a JSON object of HF config keys, got {_shown(config)}")
    return config

"""`models.<name>.init_device`: random initial weights drawn on the CPU (default) or on the run's device.

The "device" path is what large GPU runs use (drawing 9B parameters on the CPU takes minutes); here it runs with the
device being the CPU, which exercises the same code (a generator on the model's device, in-place normal_).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from opdgraph.config import ConfigError, load_pipeline
from opdgraph.models import load_decoder
from opdgraph.models.layers import RMSNorm
from opdgraph.models.tiny_configs import tiny_config
from opdgraph.runtime.model_loading import load_models

TINY_PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "tiny.toml"


def _device_init(config: dict, seed: int, dtype=torch.float32):
    return load_decoder(config, dtype=dtype, init_seed=seed, init_device="device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_init_has_the_configured_distribution(dtype):
    """Device-drawn weights would not be normal(0, initializer_range), biases not zero, or norms not reset."""
    config = tiny_config("qwen2")  # q/k/v biases; vocab 300 x hidden 64 gives 19,200 embedding values
    config["initializer_range"] = 0.05
    model = _device_init(config, seed=0, dtype=dtype)
    matrices = [(name, p) for name, p in model.named_parameters()
                if not name.endswith(".bias") and not isinstance(model.get_submodule(name.rsplit(".", 1)[0]), RMSNorm)]
    values = torch.cat([p.detach().double().flatten() for _, p in matrices])
    assert abs(values.mean().item()) < 0.05 * 4 / values.numel() ** 0.5  # 4 standard errors of the mean
    assert abs(values.std().item() / 0.05 - 1) < 0.02
    fourth_moment = (values**4).mean().item() / values.var().item() ** 2
    assert abs(fourth_moment - 3) < 0.1  # a normal's kurtosis, not a uniform's 1.8
    biases = [p for name, p in model.named_parameters() if name.endswith(".bias")]
    assert biases and all(torch.count_nonzero(p) == 0 for p in biases)
    norms = [m.weight for m in model.modules() if isinstance(m, RMSNorm)]
    assert norms and all(torch.equal(w, torch.ones_like(w)) for w in norms)


def test_device_init_is_seeded_and_every_matrix_differs():
    """The device path would ignore its seed, or draw the same values into several matrices."""
    config = tiny_config("qwen3")
    first, again, other = _device_init(config, 3), _device_init(config, 3), _device_init(config, 4)
    for (name, a), (_, b), (_, c) in zip(first.named_parameters(), again.named_parameters(),
                                         other.named_parameters()):
        assert torch.equal(a, b), name
    q, k = first.layers[0].self_attn.q_proj.weight, first.layers[0].self_attn.k_proj.weight
    assert not torch.equal(first.embed_tokens.weight, other.embed_tokens.weight)
    assert not torch.equal(q.flatten()[:100], k.flatten()[:100])


def test_cpu_default_is_unchanged_by_the_option():
    """The default would stop being the device-independent CPU draw (runs would change their weights)."""
    config = tiny_config("llama")
    default = load_decoder(config, dtype=torch.float32, init_seed=2)
    explicit = load_decoder(config, dtype=torch.float32, init_seed=2, init_device="cpu")
    generator = torch.Generator().manual_seed(2)
    expected_embedding = torch.randn(default.embed_tokens.weight.shape, generator=generator) * 0.02
    assert torch.equal(default.embed_tokens.weight, expected_embedding)
    assert torch.equal(explicit.embed_tokens.weight, default.embed_tokens.weight)


def test_runtime_builds_models_with_the_configured_init_device(monkeypatch):
    """`opdgraph run` would ignore models.<name>.init_device (the setting would do nothing)."""
    from opdgraph.models.decoder import DecoderLM

    drawn_on_device = {}
    original = DecoderLM.reset_parameters

    def recording(self, seed, *, on_device=False):
        drawn_on_device[self.config.hidden_size] = on_device
        original(self, seed, on_device=on_device)

    monkeypatch.setattr(DecoderLM, "reset_parameters", recording)
    cfg = load_pipeline(str(TINY_PIPELINE), ['models.student.init_device="device"'])
    assert cfg.models["student"].init_device == "device" and cfg.models["teacher"].init_device == "cpu"
    load_models(cfg.models, TINY_PIPELINE.parent, torch.device("cpu"))
    student_hidden, teacher_hidden = (cfg.models[name].config["hidden_size"] for name in ("student", "teacher"))
    assert drawn_on_device == {student_hidden: True, teacher_hidden: False}


def test_bad_init_device_names_the_key():
    """A misspelt init_device would be accepted (or the error would not say which key and what is valid)."""
    with pytest.raises(ConfigError) as caught:
        load_pipeline(str(TINY_PIPELINE), ['models.teacher.init_device="gpu"'])
    text = str(caught.value)
    assert "models.teacher.init_device" in text and "'cpu'" in text and "'device'" in text
    with pytest.raises(ValueError, match="init_device"):
        load_decoder(tiny_config("qwen2"), dtype=torch.float32, init_device="cuda")

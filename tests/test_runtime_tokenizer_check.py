"""The run refuses a student/teacher pair whose tokenizers map text to different ids, before loading weights."""

from pathlib import Path

import pytest
from opdgraph.config import load_pipeline
from opdgraph.models import ByteTokenizer, ModelLoadError
from opdgraph.runtime import startup as run
from opdgraph.runtime.model_loading import check_same_tokenizer

TINY = Path(__file__).parent.parent / "pipelines" / "tiny.toml"


class ShiftedTokenizer(ByteTokenizer):
    """Same vocabulary size, different ids: full-vocabulary distillation would compare unrelated tokens."""

    name = "shifted"

    def encode(self, text):
        return [(b + 1) % 256 for b in super().encode(text)]


def test_same_tokenizer_passes_and_different_one_is_refused():
    """Without this check a mismatched pair would train silently on meaningless targets."""
    check_same_tokenizer(ByteTokenizer(), ByteTokenizer())
    with pytest.raises(ModelLoadError, match="different tokenizers"):
        check_same_tokenizer(ByteTokenizer(), ShiftedTokenizer())


def test_mismatch_is_reported_before_any_weights_are_loaded(monkeypatch):
    """If this fails, a mismatched pair is found only after both models' weights were read (17 s on real models)."""
    cfg = load_pipeline(str(TINY))
    teacher = next(name for name, model in cfg.models.items() if model.role == "teacher")
    import opdgraph.models.loading as loading

    real = loading.load_tokenizer
    monkeypatch.setattr(loading, "load_tokenizer", lambda source, vocab: (
        ShiftedTokenizer() if source == dict(cfg.models[teacher].config) else real(source, vocab)))
    weights_read = []
    monkeypatch.setattr("opdgraph.models.load_decoder", lambda *a, **k: weights_read.append(1))
    monkeypatch.setattr(run, "_load_prompts", lambda *a, **k: pytest.fail("prompts loaded before the tokenizers"))
    with pytest.raises(ModelLoadError, match=rf"\[models.{teacher}\].*different tokenizers"):
        run.check_startup(cfg)
    assert weights_read == []

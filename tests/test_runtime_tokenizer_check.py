"""The run refuses a student/teacher pair whose tokenizers map text to different ids."""

import pytest

from opdgraph.models import ByteTokenizer
from opdgraph.runtime.context import check_same_tokenizer


class ShiftedTokenizer(ByteTokenizer):
    """Same vocabulary size, different ids: full-vocabulary distillation would compare unrelated tokens."""

    name = "shifted"

    def encode(self, text):
        return [(b + 1) % 256 for b in super().encode(text)]


def test_same_tokenizer_passes_and_different_one_is_refused():
    """Without this check a mismatched pair would train silently on meaningless targets."""
    check_same_tokenizer(ByteTokenizer(), ByteTokenizer())
    with pytest.raises(RuntimeError, match="tokenizers differ"):
        check_same_tokenizer(ByteTokenizer(), ShiftedTokenizer())

"""Two-stage backward (analytic chunked loss grads + one backbone backward) vs one dense autograd backward."""

from __future__ import annotations

import copy

import pytest
import torch

from opdgraph.train.divergence import chunked_divergence
from opdgraph.train.two_stage import two_stage_backward

VOCAB, HIDDEN, TEACHER_VOCAB = 37, 12, 40


class TinyStudent(torch.nn.Module):
    """Embedding -> linear+tanh backbone -> lm_head (tied to the embedding or separate)."""

    def __init__(self, tied: bool):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.backbone = torch.nn.Linear(HIDDEN, HIDDEN)
        self.lm_head = None if tied else torch.nn.Parameter(torch.randn(VOCAB, HIDDEN) * 0.3)

    def head_weight(self) -> torch.nn.Parameter:
        return self.embed.weight if self.lm_head is None else self.lm_head

    def hidden(self, token_ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.backbone(self.embed(token_ids)))


def dense_loss(model, token_ids, teacher_logits, weights, divergence):
    """The loss on full logits, straight from the definitions, for autograd."""
    log_p_s = torch.log_softmax(model.hidden(token_ids) @ model.head_weight().T, dim=-1)
    log_p_t = torch.log_softmax(teacher_logits, dim=-1)
    if divergence == "forward_kl":
        per_token = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    else:
        per_token = (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1)
    return (weights * per_token).sum()


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_two_stage_equals_dense_backward(tied, divergence):
    """Every parameter grad (embedding, backbone, head; tied head = embedding) equals a dense float64 backward.
    A failure means the lm_head grad was dropped, double counted, or overwrote the tied embedding's grad."""
    torch.manual_seed(0)
    model = TinyStudent(tied)
    reference = copy.deepcopy(model).double()
    token_ids = torch.randint(0, VOCAB, (23,))
    teacher_hidden, teacher_head = torch.randn(23, 9), torch.randn(TEACHER_VOCAB, 9)
    weights = torch.rand(23)

    hidden = model.hidden(token_ids)
    lm_head_grad = torch.zeros(VOCAB, HIDDEN)
    result = chunked_divergence(
        hidden, model.head_weight(), teacher_hidden, teacher_head, weights,
        divergence=divergence, chunk_tokens=5, lm_head_grad=lm_head_grad,
    )
    two_stage_backward(hidden, result.hidden_grad, model.head_weight(), lm_head_grad)

    teacher_logits = teacher_hidden.double() @ teacher_head.double()[:VOCAB].T
    dense_loss(reference, token_ids, teacher_logits, weights.double(), divergence).backward()
    for (name, param), (_, ref_param) in zip(model.named_parameters(), reference.named_parameters()):
        error = (param.grad.double() - ref_param.grad).abs().max()
        assert error <= 1e-5 * ref_param.grad.abs().max(), name


def test_lm_head_grad_is_copied_not_aliased():
    """Zeroing the accumulator for the next micro-batch must not wipe the parameter's grad."""
    model = TinyStudent(tied=False)
    hidden = model.hidden(torch.tensor([1, 2, 3]))
    accumulator = torch.ones(VOCAB, HIDDEN)
    two_stage_backward(hidden, torch.ones_like(hidden), model.lm_head, accumulator)
    accumulator.zero_()
    assert (model.lm_head.grad == 1).all()

"""Chunked divergences vs a dense float64 autograd reference built straight from the definitions."""

from __future__ import annotations

import pytest
import torch

from opdgraph.train import divergence as divergence_module
from opdgraph.train.divergence import chunked_divergence, divergence_metrics
from opdgraph.train.losses import divergence_chunk_grad

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "sampled_token"]


def make_inputs(num_positions, vocab, teacher_vocab, seed, dtype=torch.float32, student_dim=16, teacher_dim=24):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype)

    weights = torch.rand(num_positions, generator=generator)
    weights[torch.rand(num_positions, generator=generator) < 0.3] = 0.0  # masked positions
    return dict(
        student_hidden=randn(num_positions, student_dim),
        student_lm_head=randn(vocab, student_dim, scale=0.5),
        teacher_hidden=randn(num_positions, teacher_dim),
        teacher_lm_head=randn(teacher_vocab, teacher_dim, scale=0.5),
        weights=weights,
        sampled_ids=torch.randint(0, vocab, (num_positions,), generator=generator),
    )


def dense_reference(inputs, divergence, beta, temperature):
    """Full float64 logits, each definition written naively, gradients by autograd."""
    hidden = inputs["student_hidden"].double().requires_grad_()
    lm_head = inputs["student_lm_head"].double().requires_grad_()
    vocab = lm_head.shape[0]
    teacher_logits = inputs["teacher_hidden"].double() @ inputs["teacher_lm_head"].double()[:vocab].T / temperature
    log_p_s = torch.log_softmax(hidden @ lm_head.T / temperature, dim=-1)
    log_p_t = torch.log_softmax(teacher_logits, dim=-1)
    p_s, p_t = log_p_s.exp(), log_p_t.exp()
    if divergence == "forward_kl":
        per_token = (p_t * (log_p_t - log_p_s)).sum(-1)
        loss_terms = per_token
    elif divergence == "reverse_kl":
        per_token = (p_s * (log_p_s - log_p_t)).sum(-1)
        loss_terms = per_token
    elif divergence == "jsd":
        mixture = beta * p_t + (1 - beta) * p_s
        per_token = beta * (p_t * (log_p_t - mixture.log())).sum(-1) + (1 - beta) * (
            p_s * (log_p_s - mixture.log())
        ).sum(-1)
        loss_terms = per_token
    else:
        ids = inputs["sampled_ids"].unsqueeze(1)
        log_p_s_y = log_p_s.gather(1, ids).squeeze(1)
        advantage = (log_p_s_y - log_p_t.gather(1, ids).squeeze(1)).detach()
        per_token = advantage
        loss_terms = advantage * log_p_s_y
    loss = (inputs["weights"].double() * loss_terms).sum()
    loss.backward()
    return loss.detach(), hidden.grad, lm_head.grad, per_token.detach()


def assert_close_rel(actual, expected, rtol):
    """Max error relative to the reference's largest magnitude (elementwise rtol is meaningless near zero)."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max() if expected.numel() else torch.tensor(0.0, dtype=torch.float64)
    error = (actual - expected).abs().max() if expected.numel() else torch.tensor(0.0, dtype=torch.float64)
    assert error <= rtol * scale + 1e-12, f"max error {error:.3e} vs scale {scale:.3e} (rtol {rtol})"


def run_chunked(inputs, divergence, beta, temperature, chunk_tokens, lm_head_grad=None):
    vocab, dim = inputs["student_lm_head"].shape
    lm_head_grad = torch.zeros(vocab, dim) if lm_head_grad is None else lm_head_grad
    result = chunked_divergence(
        inputs["student_hidden"],
        inputs["student_lm_head"],
        inputs["teacher_hidden"],
        inputs["teacher_lm_head"],
        inputs["weights"],
        divergence=divergence,
        beta=beta,
        temperature=temperature,
        chunk_tokens=chunk_tokens,
        sampled_ids=inputs["sampled_ids"] if divergence == "sampled_token" else None,
        lm_head_grad=lm_head_grad,
    )
    return result, lm_head_grad


SHAPES = [  # (num_positions, vocab, teacher_vocab, chunk_tokens): chunks larger / smaller / not dividing N
    (13, 97, 97, 64),
    (13, 97, 128, 4),
    (29, 257, 300, 7),
    (8, 257, 257, 1),
]


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_dense_float64_reference(divergence, temperature, shape):
    """Loss, per-token values, hidden and lm_head grads equal the dense fp64 definition; a failure means a wrong
    analytic gradient, a temperature applied to one side only, a chunk boundary bug or teacher vocab mishandled."""
    num_positions, vocab, teacher_vocab, chunk_tokens = shape
    inputs = make_inputs(num_positions, vocab, teacher_vocab, seed=hash(shape) % 1000)
    result, lm_head_grad = run_chunked(inputs, divergence, 0.5, temperature, chunk_tokens)
    loss, hidden_grad, lm_head_grad_ref, per_token = dense_reference(inputs, divergence, 0.5, temperature)
    assert_close_rel(result.loss, loss, 1e-5)
    assert_close_rel(result.per_token, per_token, 1e-5)
    assert_close_rel(result.hidden_grad, hidden_grad, 1e-5)
    assert_close_rel(lm_head_grad, lm_head_grad_ref, 1e-5)
    assert result.hidden_grad.dtype == torch.float32 and result.loss.dtype == torch.float32
    assert (result.hidden_grad[inputs["weights"] == 0] == 0).all()


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("temperature", [0.7, 2.0])
def test_jsd_beta_matches_reference(beta, temperature):
    """JSD at several beta: a failure means beta and 1 - beta are swapped in the mixture or the gradient."""
    inputs = make_inputs(11, 97, 120, seed=int(beta * 100))
    result, lm_head_grad = run_chunked(inputs, "jsd", beta, temperature, chunk_tokens=4)
    loss, hidden_grad, lm_head_grad_ref, per_token = dense_reference(inputs, "jsd", beta, temperature)
    assert_close_rel(result.loss, loss, 1e-5)
    assert_close_rel(result.per_token, per_token, 1e-5)
    assert_close_rel(result.hidden_grad, hidden_grad, 1e-5)
    assert_close_rel(lm_head_grad, lm_head_grad_ref, 1e-5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_bf16_inputs_within_bf16_tolerance(divergence):
    """bf16 inputs: everything after the inputs is fp32 (logits accumulate in fp32), so loss, per-token values and
    the fp32 lm_head grad match fp64 on the same bf16 values to 1e-4; only hidden_grad, a bf16 output, is at ~1e-2.
    A failure means logits were rounded to bf16 or the softmax/divergence/accumulation ran in bf16."""
    inputs = make_inputs(21, 257, 300, seed=5, dtype=torch.bfloat16)
    result, lm_head_grad = run_chunked(inputs, divergence, 0.5, 1.0, chunk_tokens=8)
    loss, hidden_grad, lm_head_grad_ref, per_token = dense_reference(inputs, divergence, 0.5, 1.0)
    assert result.hidden_grad.dtype == torch.bfloat16
    assert_close_rel(result.loss, loss, 1e-4)
    assert_close_rel(result.per_token, per_token, 1e-4)
    assert_close_rel(lm_head_grad, lm_head_grad_ref, 1e-4)
    assert_close_rel(result.hidden_grad, hidden_grad, 1e-2)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_empty_input(divergence):
    """N = 0 gives a zero loss, an empty hidden grad and leaves the lm_head accumulator alone (an empty micro-batch
    shard must not crash or corrupt gradients)."""
    inputs = make_inputs(0, 97, 97, seed=1)
    accumulator = torch.full((97, 16), 3.0)
    result, lm_head_grad = run_chunked(inputs, divergence, 0.5, 1.0, 8, lm_head_grad=accumulator)
    assert result.loss.item() == 0.0 and result.hidden_grad.shape == (0, 16) and result.per_token.shape == (0,)
    assert (lm_head_grad == 3.0).all()


def test_lm_head_grad_is_accumulated_in_place():
    """The lm_head accumulator is added into, not overwritten, so micro-batches can share it."""
    inputs = make_inputs(9, 97, 97, seed=2)
    start = torch.randn(97, 16)
    _, lm_head_grad = run_chunked(inputs, "reverse_kl", 0.5, 1.0, 4, lm_head_grad=start.clone())
    _, _, lm_head_grad_ref, _ = dense_reference(inputs, "reverse_kl", 0.5, 1.0)
    assert_close_rel(lm_head_grad - start, lm_head_grad_ref, 1e-5)


def test_sampled_token_estimate_is_weighted_mean_of_advantage():
    """For sampled_token the estimate is sum w_i a_i (the mean a_i under token normalisation), not the surrogate."""
    inputs = make_inputs(15, 97, 97, seed=3)
    result, _ = run_chunked(inputs, "sampled_token", 0.5, 1.0, 4)
    _, _, _, advantage = dense_reference(inputs, "sampled_token", 0.5, 1.0)
    assert_close_rel(result.estimate, (inputs["weights"].double() * advantage).sum(), 1e-5)


def test_memory_is_bounded_by_chunk(monkeypatch):
    """No logits tensor has more than chunk_tokens rows, whatever N; a failure means full [N, V] logits exist."""
    seen_rows = []
    original = divergence_module.logits_fp32

    def recording(hidden, lm_head):
        seen_rows.append(hidden.shape[0])
        return original(hidden, lm_head)

    monkeypatch.setattr(divergence_module, "logits_fp32", recording)
    run_chunked(make_inputs(50, 97, 97, seed=4), "jsd", 0.5, 1.0, chunk_tokens=6)
    assert max(seen_rows) == 6 and sum(seen_rows) == 2 * 50


def test_chunk_grad_writes_dlogits_into_student_buffer():
    """The kernel contract: dlogits reuses the student logits storage (no extra [C, V] output buffer)."""
    student, teacher = torch.randn(5, 33), torch.randn(5, 33)
    chunk = divergence_chunk_grad(student, teacher, torch.ones(5), "reverse_kl")
    assert chunk.dlogits.data_ptr() == student.data_ptr()


def test_metrics_match_reference():
    """Eval metrics (reverse/forward KL, top-1 agreement) match fp64 definitions, standalone and from the loss."""
    inputs = make_inputs(17, 97, 110, seed=6)
    temperature = 0.7
    metrics = divergence_metrics(
        inputs["student_hidden"], inputs["student_lm_head"], inputs["teacher_hidden"], inputs["teacher_lm_head"],
        temperature=temperature, chunk_tokens=5,
    )
    _, _, _, reverse_kl = dense_reference(inputs, "reverse_kl", 0.5, temperature)
    _, _, _, forward_kl = dense_reference(inputs, "forward_kl", 0.5, temperature)
    student_logits = inputs["student_hidden"].double() @ inputs["student_lm_head"].double().T
    teacher_logits = inputs["teacher_hidden"].double() @ inputs["teacher_lm_head"].double()[:97].T
    assert_close_rel(metrics.reverse_kl, reverse_kl, 1e-5)
    assert_close_rel(metrics.forward_kl, forward_kl, 1e-5)
    assert torch.equal(metrics.top1_agree, student_logits.argmax(-1) == teacher_logits.argmax(-1))
    with_loss = chunked_divergence(
        inputs["student_hidden"], inputs["student_lm_head"], inputs["teacher_hidden"], inputs["teacher_lm_head"],
        inputs["weights"], divergence="forward_kl", temperature=temperature, chunk_tokens=3, return_metrics=True,
    ).metrics
    assert torch.allclose(with_loss.reverse_kl, metrics.reverse_kl, atol=1e-6)
    assert torch.equal(with_loss.top1_agree, metrics.top1_agree)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(divergence="jsd", beta=0.0), "strictly between 0 and 1"),
        (dict(divergence="jsd", beta=1.0), "strictly between 0 and 1"),
        (dict(divergence="kl"), "unknown divergence"),
        (dict(divergence="sampled_token"), "needs sampled_ids"),
        (dict(divergence="reverse_kl", temperature=0.0), "temperature"),
        (dict(divergence="reverse_kl", chunk_tokens=0), "chunk_tokens"),
    ],
)
def test_bad_settings_raise_clear_errors(kwargs, message):
    """Out-of-domain settings fail loudly with a message saying what to change, instead of returning NaN or 0."""
    inputs = make_inputs(4, 97, 97, seed=7)
    kwargs = {"chunk_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        chunked_divergence(
            inputs["student_hidden"], inputs["student_lm_head"], inputs["teacher_hidden"],
            inputs["teacher_lm_head"], inputs["weights"], **kwargs,
        )


def test_teacher_vocab_smaller_than_student_is_rejected():
    """A teacher that cannot score every student token is a configuration error, not a silent truncation."""
    inputs = make_inputs(4, 97, 90, seed=8)
    with pytest.raises(ValueError, match="teacher vocab 90 is smaller"):
        run_chunked(inputs, "reverse_kl", 0.5, 1.0, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_logits_keep_fp32_accumulator():
    """On CUDA the bf16 matmul writes fp32 logits; a failure means logits are rounded to bf16 before the softmax."""
    hidden = torch.randn(32, 64, device="cuda").bfloat16()
    lm_head = torch.randn(1000, 64, device="cuda").bfloat16()
    logits = divergence_module.logits_fp32(hidden, lm_head)
    reference = hidden.double() @ lm_head.double().T
    assert logits.dtype == torch.float32
    assert (logits.double() - reference).abs().max() < 1e-3

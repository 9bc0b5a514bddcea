"""The fused rollout-forward kernels (opdgraph.kernels.fused_decode) against the plain-torch model code they replace.

References are the model's own modules (RMSNorm.forward, rope.cos_sin + apply_rotary, the reference backend's cache
write, F.silu / F.gelu), which test_models_parity.py checks against transformers; the last tests run whole
``forward_paged`` calls with the fused flag on and off. Without CUDA the kernels run in the Triton interpreter
(TRITON_INTERPRET=1, set before triton is first imported) on tiny, deliberately odd shapes: rows that are not a
power of two, head_dim 24, strided views of a fused projection output.

Tolerances are in units of the reference's dtype epsilon: the kernels round where torch rounds, so they agree
exactly except where float32 transcendentals or reduction orders differ (an ulp in float32; rarely one ulp in
bfloat16).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from opdgraph.models import load_decoder
from opdgraph.models.attention_metadata import PagedMetadata
from opdgraph.models.layers import RMSNorm
from opdgraph.models.rope import apply_rotary, cos_sin
from opdgraph.models.tiny_configs import tiny_config

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from opdgraph.kernels.fused_decode import (  # noqa: E402
    fused_add_rms_norm,
    gated_activation,
    rms_norm,
    rope_and_store_kv,
)

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
              # Masked lanes and exp overflow at the limits of tanh are computed and then discarded.
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]
# bfloat16 results must be bit-identical in the interpreter (its float32 math and torch's CPU kernels agree to an ulp,
# far below a bfloat16 step, for these inputs); compiled GPU math (approximate rsqrt, libdevice cos) may move a rare
# element by one bfloat16 step. float32 results carry those few-ulp differences directly.
BF16_ULPS = 1.0 if torch.cuda.is_available() else 0.0


def assert_matches(actual: torch.Tensor, expected: torch.Tensor):
    if expected.dtype == torch.bfloat16:
        assert_within_ulps(actual, expected, ulps=BF16_ULPS)
    else:
        assert_within_ulps(actual, expected, ulps=8.0, atol=1e-6)


def assert_within_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: float = 1.0, atol: float = 0.0):
    """|actual - expected| <= ulps * eps(dtype) * |expected| + atol, elementwise; same dtype and shape."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    actual64, expected64 = actual.double(), expected.double()
    bound = ulps * torch.finfo(expected.dtype).eps * expected64.abs() + atol
    excess = (actual64 - expected64).abs() - bound
    assert excess.max() <= 0, f"max excess {excess.max():.3g} at {excess.argmax()}"


def random(*shape, dtype, scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).to(dtype).to(DEVICE)


def reference_norm(width, one_plus, dtype):
    norm = RMSNorm(width, 1e-6, one_plus)
    norm.weight.data = random(width, dtype=torch.float32, scale=0.5, seed=9).cpu() + (0.0 if one_plus else 1.0)
    return norm.to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("one_plus", [False, True])
@pytest.mark.parametrize("width", [1, 67, 384])
def test_fused_add_rms_norm_matches_rmsnorm_after_add(dtype, one_plus, width):
    """The residual sum or the norm differ from `hidden + out` then RMSNorm.forward: wrong rounding order, wrong
    one-plus form, masked tail lanes counted in the mean, or row strides of a strided view ignored."""
    norm = reference_norm(width, one_plus, dtype)
    wide = random(5, width + 3, dtype=dtype, seed=1)
    x = wide[:, 2:width + 2]  # a strided view, as a slice of a fused output would be
    residual = random(5, width, dtype=dtype, scale=4.0, seed=2)
    normed, new_residual = fused_add_rms_norm(x, residual, norm.weight, norm.eps, one_plus)
    expected_residual = residual + x
    assert torch.equal(new_residual, expected_residual)
    assert_matches(normed, norm(expected_residual))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("one_plus", [False, True])
def test_rms_norm_of_heads_matches_rmsnorm(dtype, one_plus):
    """Per-head q/k norm (Qwen3, Gemma 3) over [T, H, D] differs from RMSNorm.forward: rows of a 3-d input are
    flattened wrongly."""
    norm = reference_norm(24, one_plus, dtype)
    x = random(3, 5, 24, dtype=dtype, scale=3.0, seed=3)
    assert_matches(rms_norm(x, norm.weight, norm.eps, one_plus), norm(x))


def fused_qkv(num_tokens, num_heads, num_kv_heads, head_dim, dtype, seed=4):
    """q, k, v as strided views of one [T, (Hq + 2 Hkv) * D] projection output."""
    qkv = random(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, scale=2.0, seed=seed)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    return (q.view(num_tokens, num_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim),
            v.view(num_tokens, num_kv_heads, head_dim))


def reference_cache_write(cache, k, v, slots):
    """The plain cache write; a float8 cache saturates at +-448 (clamped, then torch's cast on the CPU: past 448
    torch's casts differ by device and version, NaN or 448, while in range they all round to nearest even)."""
    device, cache = cache.device, cache.clone().cpu()
    num_kv_heads, head_dim = cache.shape[-2:]
    if cache.dtype == torch.float8_e4m3fn:
        k, v = k.clamp(-448.0, 448.0), v.clamp(-448.0, 448.0)
    cache[0].view(-1, num_kv_heads, head_dim)[slots.cpu()] = k.cpu().to(cache.dtype)
    cache[1].view(-1, num_kv_heads, head_dim)[slots.cpu()] = v.cpu().to(cache.dtype)
    return cache.to(device)


ROPE_CASES = [  # (tokens, query heads, kv heads, head_dim)
    (5, 3, 1, 24),
    (2, 4, 2, 16),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, num_heads, num_kv_heads, head_dim", ROPE_CASES)
@pytest.mark.parametrize("qk_norm", [None, "standard", "one_plus"])
def test_rope_and_store_kv_matches_rotary_and_cache_write(dtype, tokens, num_heads, num_kv_heads, head_dim, qk_norm):
    """Rotated q or cached k/v differ from (q_norm / k_norm, then) apply_rotary + the reference cache write: wrong
    angle or rounding of cos/sin, halves swapped, GQA heads mixed up, page/offset of a slot wrong, untouched slots
    overwritten, or the per-head norm's statistics taken over one half of the head."""
    q, k, v = fused_qkv(tokens, num_heads, num_kv_heads, head_dim, dtype)
    positions = torch.tensor([0, 3, 127, 2049, 31999][:tokens], device=DEVICE)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    page_size, num_pages = 3, 4
    slots = torch.tensor([11, 0, 5, 7, 3][:tokens], device=DEVICE)
    cache = random(2, num_pages, page_size, num_kv_heads, head_dim, dtype=dtype, seed=5)  # stale contents
    expected_cache = cache.clone()
    norms = {}
    if qk_norm is not None:
        q_norm, k_norm = (reference_norm(head_dim, qk_norm == "one_plus", dtype) for _ in range(2))
        k_norm.weight.data = k_norm.weight.data.flip(0)  # unlike q_norm's, so that mixing them up shows
        norms = dict(q_norm_weight=q_norm.weight, k_norm_weight=k_norm.weight, norm_eps=q_norm.eps,
                     norm_one_plus=q_norm.one_plus)
    rotated_q = rope_and_store_kv(q, k, v, positions, inv_freq.to(DEVICE), cache, slots, **norms)

    if qk_norm is not None:
        q, k = q_norm(q), k_norm(k)
    cos, sin = cos_sin(inv_freq, positions, dtype)
    expected_cache = reference_cache_write(expected_cache, apply_rotary(k, cos, sin), v, slots)
    assert rotated_q.is_contiguous()
    assert_matches(rotated_q, apply_rotary(q, cos, sin))
    assert_matches(cache, expected_cache)


def test_float8_cache_stores_what_torch_cast_stores():
    """The float8_e4m3fn encoding differs from a saturating cast (rounding of ties, subnormals, saturation at 448,
    inf, NaN, negative zero), k is cast before its rotation instead of after, or the plain cache writes (the torch
    reference backend and flashinfer's write_kv) encode differently: torch's own cast makes NaN of values past 448
    on some devices and versions (a NaN in the cache poisons every later attention), so they clamp first."""
    tokens, num_kv_heads, head_dim = 4, 2, 16
    q, k, v = fused_qkv(tokens, 2, num_kv_heads, head_dim, torch.float32, seed=6)
    specials = torch.tensor([448.0, 449.0, 464.0, 480.0, 1e6, float("inf"), -float("inf"), float("nan"), -0.0,
                             2.0**-10, 3 * 2.0**-11, 1.5 * 2.0**-9, 2.5 * 2.0**-9, 2.0**-6, 0.96875 * 2.0**-6, 1.0625])
    v = (v * torch.logspace(-4, 3, head_dim, device=DEVICE)).clone()  # magnitudes from subnormal to saturating
    v[0, 0] = specials.to(DEVICE)
    v[1, 1] = -specials.to(DEVICE)
    positions = torch.tensor([1, 2, 300, 4000], device=DEVICE)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    slots = torch.tensor([3, 4, 9, 0], device=DEVICE)
    cache = torch.zeros(2, 3, 4, num_kv_heads, head_dim, dtype=torch.float8_e4m3fn, device=DEVICE)
    rope_and_store_kv(q, k, v, positions, inv_freq.to(DEVICE), cache, slots)

    cos, sin = cos_sin(inv_freq, positions, torch.float32)
    expected = reference_cache_write(torch.zeros_like(cache), apply_rotary(k, cos, sin), v, slots)
    # V is stored as given: its bytes test the encoding alone and must be torch's exactly, on every device.
    assert torch.equal(cache[1].view(torch.uint8), expected[1].view(torch.uint8))
    from opdgraph.kernels.flashinfer_attention import write_kv
    from opdgraph.models.attention_backend import to_cache_dtype

    plain = torch.zeros_like(cache)
    write_kv(plain, k, v, slots)
    assert torch.equal(plain[1].view(torch.uint8), expected[1].view(torch.uint8))
    assert torch.equal(to_cache_dtype(v, cache.dtype).view(torch.uint8).cpu(),
                       v.cpu().clamp(-448.0, 448.0).to(cache.dtype).view(torch.uint8))
    got_k, want_k = cache[0].view(torch.uint8), expected[0].view(torch.uint8)
    if not torch.cuda.is_available():
        assert torch.equal(got_k, want_k)
    else:
        # Compiled cos/sin may differ from torch's by an ulp, and a rotated K value sitting on an e4m3 rounding
        # boundary then lands one code away: at most one e4m3 step (1/8 relative, 2^-9 absolute near zero).
        got_values, want_values = cache[0].float(), expected[0].float()
        torch.testing.assert_close(got_values, want_values, rtol=2**-3, atol=2**-9, equal_nan=True)


def test_rope_and_store_kv_with_no_tokens():
    """An empty forward launches nothing and returns an empty q instead of failing on a zero-size grid."""
    q, k, v = fused_qkv(0, 2, 1, 16, torch.float32)
    cache = torch.zeros(2, 1, 2, 1, 16, device=DEVICE)
    empty = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    assert rope_and_store_kv(q, k, v, empty, torch.ones(8, device=DEVICE), cache, empty).shape == (0, 2, 16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gated_activation_matches_mlp(dtype, activation):
    """act(gate) * up differs from GatedMLP's F.silu / F.gelu(tanh) then multiply: missing rounding of the
    activation, a wrong GELU constant, or the second block of a row (inner size > block) mishandled."""
    inner = 1100  # more than one 1024-wide block, not a multiple of it
    gate_up = random(3, 2 * inner, dtype=dtype, scale=4.0, seed=7)
    gate, up = gate_up[:, :inner], gate_up[:, inner:]  # halves of a fused gate/up projection
    reference = F.silu(gate) if activation == "silu" else F.gelu(gate, approximate="tanh")
    actual = gated_activation(gate, up, activation)
    if activation == "silu":
        assert_matches(actual, reference * up)
    else:
        # GELU's 1 + tanh cancels for gates below about -4, where torch's own result is float32 noise of ~1e-7
        # (times |up| <= ~16) that our tanh does not reproduce bit for bit.
        assert_within_ulps(actual, reference * up, ulps=1.0 if dtype == torch.bfloat16 else 8.0, atol=4e-6)


def test_gated_activation_rejects_unknown_activation():
    """A typo in the activation name silently runs SiLU instead of failing."""
    with pytest.raises(ValueError, match="relu"):
        gated_activation(torch.ones(1, 2), torch.ones(1, 2), "relu")


# ------------------------------------------------------------------------------------------------- whole forward
def paged_schedule(page_size: int):
    """A two-sequence prefill (5 and 3 tokens) then three decode steps; yields (lengths before, counts, meta)."""
    pages = [[6, 1, 4], [2, 7, 0]]  # scrambled, so a sequence's pages are not contiguous
    lengths = [0, 0]
    for counts in ([5, 3], [1, 1], [1, 1], [1, 0]):
        slots = [pages[seq][position // page_size] * page_size + position % page_size
                 for seq, count in enumerate(counts) for position in range(lengths[seq], lengths[seq] + count)]
        before = list(lengths)
        lengths = [length + count for length, count in zip(lengths, counts)]
        query_lens = torch.tensor(counts, dtype=torch.int32)
        meta = PagedMetadata(query_lens=query_lens.to(DEVICE),
                             cu_query_lens=torch.tensor([0, counts[0], sum(counts)], dtype=torch.int32, device=DEVICE),
                             kv_lens=torch.tensor(lengths, dtype=torch.int32, device=DEVICE),
                             page_table=torch.tensor(pages, dtype=torch.int32, device=DEVICE),
                             slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE), page_size=page_size)
        yield before, counts, meta


def run_forward_paged(model, fused: bool, tokens: list[list[int]], kv_dtype, page_size=3):
    model.use_fused_decode_kernels = fused
    kv_cache = model.allocate_kv_cache(8, page_size, dtype=kv_dtype)
    hidden_per_step = []
    for before, counts, meta in paged_schedule(page_size):
        spans = [(seq, position) for seq, count in enumerate(counts)
                 for position in range(before[seq], before[seq] + count)]
        ids = torch.tensor([tokens[seq][position] for seq, position in spans], device=DEVICE)
        positions = torch.tensor([position for _, position in spans], device=DEVICE)
        hidden_per_step.append(model.forward_paged(ids, positions, meta, kv_cache))
    model.use_fused_decode_kernels = False
    return hidden_per_step, kv_cache


def assert_same_forward(fused: torch.Tensor, plain: torch.Tensor):
    """float32: a few ulps; bfloat16 and float8: bit-identical in the interpreter, one rounding step on a GPU."""
    if plain.dtype == torch.float32:
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    elif torch.cuda.is_available():
        torch.testing.assert_close(fused.float(), plain.float(), rtol=2**-6, atol=2**-6)
    else:
        assert torch.equal(fused.view(torch.uint8), plain.view(torch.uint8))


@pytest.mark.parametrize("family, dtype, kv_dtype", [
    ("qwen2", torch.float32, None), ("qwen3", torch.float32, None), ("llama", torch.float32, None),
    ("gemma3", torch.float32, None), ("qwen3", torch.bfloat16, None), ("gemma3", torch.bfloat16, None),
    ("llama", torch.bfloat16, torch.float8_e4m3fn),
])
def test_forward_paged_fused_matches_plain(family, dtype, kv_dtype):
    """Turning use_fused_decode_kernels on changes hidden states or cache contents of prefill + decode: a residual
    add in the wrong place, q/k norm or sandwich norms (Gemma 3) skipped, the cache written twice or not at all,
    a float8 cache written differently, or a layer's RoPE frequencies (Gemma's local/global) mixed up."""
    model = load_decoder(tiny_config(family), dtype=dtype, device=DEVICE, init_seed=1)
    with torch.no_grad():  # norms at their init (ones / zeros) would hide a mixed-up norm weight
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(random(*parameter.shape, dtype=dtype, scale=0.2, seed=len(name)))
    tokens = [[17, 3, 250, 9, 41, 77, 8, 1], [5, 299, 12, 60, 2, 7, 30, 4]]
    plain_hidden, plain_cache = run_forward_paged(model, False, tokens, kv_dtype)
    fused_hidden, fused_cache = run_forward_paged(model, True, tokens, kv_dtype)
    for fused, plain in zip(fused_hidden + fused_cache, plain_hidden + plain_cache, strict=True):
        assert_same_forward(fused, plain)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_forward_paged_fused_with_stacked_qkv_matches_plain(family):
    """With the engine's stacked q/k/v projection installed (one matmul, q/k/v as strided views of its output) the
    fused forward still equals the plain one; a wrong split offset, a missing bias or a stale stack would show.
    The stack is refreshed in place after a weight change and must follow it."""
    model = load_decoder(tiny_config(family), dtype=torch.float32, device=DEVICE, init_seed=2)
    tokens = [[17, 3, 250, 9, 41, 77, 8, 1], [5, 299, 12, 60, 2, 7, 30, 4]]
    stacked = model.stack_qkv()
    with torch.no_grad():
        model.layers[0].self_attn.k_proj.weight.mul_(1.5)  # a training step after the stack was made
    restacked = model.stack_qkv(stacked)
    assert restacked[0][0].data_ptr() == stacked[0][0].data_ptr()
    model.install_fused_qkv(restacked)
    fused_hidden, fused_cache = run_forward_paged(model, True, tokens, None)
    model.install_fused_qkv(None)
    plain_hidden, plain_cache = run_forward_paged(model, False, tokens, None)
    for fused, plain in zip(fused_hidden + fused_cache, plain_hidden + plain_cache, strict=True):
        assert_same_forward(fused, plain)


@pytest.mark.parametrize("family, overrides", [("qwen2", {}), ("gemma3", {}), ("llama", {"mlp_bias": True})])
def test_forward_paged_fused_with_packed_gate_up_matches_plain(family, overrides):
    """With gate_proj and up_proj packed back to back (DecoderLM.pack_gate_up) the fused forward runs them as one
    matmul over a view of their storage and the activation reads its halves; a wrong half, a missing bias or a
    view that does not follow a later in-place weight update (an optimizer step) would change the hidden states."""
    config = tiny_config(family)
    config.update(overrides)
    model = load_decoder(config, dtype=torch.float32, device=DEVICE, init_seed=4)
    model.pack_gate_up()
    with torch.no_grad():  # a training step after packing: in place, so the view must see it
        model.layers[0].mlp.up_proj.weight.mul_(1.5)
        if model.layers[0].mlp.up_proj.bias is not None:
            model.layers[0].mlp.up_proj.bias.add_(0.25)
    assert model.install_fused_gate_up(True) == len(model.layers)
    tokens = [[17, 3, 250, 9, 41, 77, 8, 1], [5, 299, 12, 60, 2, 7, 30, 4]]
    fused_hidden, fused_cache = run_forward_paged(model, True, tokens, None)
    assert model.install_fused_gate_up(False) == 0
    plain_hidden, plain_cache = run_forward_paged(model, False, tokens, None)
    for fused, plain in zip(fused_hidden + fused_cache, plain_hidden + plain_cache, strict=True):
        assert_same_forward(fused, plain)

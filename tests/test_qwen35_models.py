"""Qwen3.5's gated-DeltaNet layers against transformers (float32) and against a float64 recurrence, on tiny configs.

What is compared: the chunked delta rule with the token-by-token recurrence (float64, several chunk sizes, a state
carried in); logits of sequences several chunks long with transformers'; gradients of every parameter with
transformers' and, for a packed batch, with the sum of per-sequence gradients (the recurrence and the conv window
must restart at every packed boundary); the weights of a multimodal qwen3_5 checkpoint (text model under
model.language_model., a vision tower and an MTP head beside it) loading as the text model.
"""

from __future__ import annotations

import copy

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from opdgraph.models import delta_rule, load_decoder
from opdgraph.models.packing import pack
from opdgraph.models.tiny_configs import tiny_config
from test_models_parity import assert_close_relative, build_hf_model, hf_logits, random_sequences


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    hf_model = build_hf_model(tiny_config("qwen3_5"), seed=4)
    directory = tmp_path_factory.mktemp("qwen3_5")
    hf_model.save_pretrained(directory)
    return hf_model, load_decoder(directory, dtype=torch.float32), directory


def recurrence(q, k, v, g, beta, state):
    outputs = []
    for t in range(q.shape[0]):
        out, state = delta_rule.recurrent_step(q[t, None], k[t, None], v[t, None], g[t, None], beta[t, None], state)
        outputs.append(out[0])
    return torch.stack(outputs), state[0]


@pytest.mark.parametrize("chunk_tokens", [1, 5, 16, 64])
@pytest.mark.parametrize("length", [1, 23, 70])
def test_chunked_delta_rule_equals_the_recurrence(chunk_tokens, length):
    """If this fails, the chunked form (triangular solve, decays within and across chunks, the last partial chunk)
    computes another recurrence than the delta rule's, or drops the state carried in."""
    generator = torch.Generator().manual_seed(length * 100 + chunk_tokens)
    heads, key_dim, value_dim = 3, 6, 5

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    q = delta_rule.l2_normalize(randn(length, heads, key_dim)) * key_dim ** -0.5
    k = delta_rule.l2_normalize(randn(length, heads, key_dim))
    v, state = randn(length, heads, value_dim), randn(heads, key_dim, value_dim)
    g = -3 * torch.rand(length, heads, generator=generator, dtype=torch.float64)
    beta = torch.rand(length, heads, generator=generator, dtype=torch.float64)
    out, final = delta_rule.chunked(q, k, v, g, beta, state, chunk_tokens)
    expected, expected_final = recurrence(q, k, v, g, beta, state[None])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(final, expected_final, rtol=0, atol=1e-12)


def test_sequences_of_several_chunks_match_transformers(hf_and_ours):
    """If this fails, the scan over chunks (sequences longer than the 64-token chunk) or the packed restart differs
    from transformers' reference."""
    hf_model, ours, _ = hf_and_ours
    sequences = random_sequences([150, 64, 65, 3], seed=7)
    input_ids, positions, meta = pack(sequences)
    with torch.no_grad():
        logits = ours.logits(ours.forward_hidden(input_ids, positions, meta))
    assert_close_relative(logits, torch.cat(hf_logits(hf_model, sequences)))


def weighted_sum(logits: torch.Tensor, seed: int) -> torch.Tensor:
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed)).to(logits.dtype)
    return (logits * weights).sum()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_gradients_equal_per_sequence_gradients(hf_and_ours, checkpointing):
    """If this fails, packed training leaks the recurrent state or the conv window across sequence boundaries (a
    sequence's gradient depends on its neighbours), or the recomputing backward of the core is wrong."""
    # The model in float64 (the delta-rule core still computes in float32, as it does for every model dtype): the
    # rest of the model then adds no summation-order noise of its own (in float32 dt_bias, whose gradient sums over
    # every position with cancellation, differed by 8e-5 relative between packed and per-sequence runs without any
    # leak); what is left is the core's float32 rounding, about 5e-7, far below what a leaked state or window gives.
    ours = copy.deepcopy(hf_and_ours[1]).double()
    sequences = random_sequences([9, 70, 4, 1], seed=11)
    ours.zero_grad()
    input_ids, positions, meta = pack(sequences)
    logits = ours.logits(ours.forward_hidden(input_ids, positions, meta, activation_checkpointing=checkpointing))
    weighted_sum(logits, 0).backward()
    packed = {name: parameter.grad.clone() for name, parameter in ours.named_parameters()}
    ours.zero_grad()
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0)).to(logits.dtype)
    offset = 0
    for sequence in sequences:
        ids, pos, one = pack([sequence])
        part = ours.logits(ours.forward_hidden(ids, pos, one))
        (part * weights[offset: offset + len(sequence)]).sum().backward()
        offset += len(sequence)
    for name, parameter in ours.named_parameters():
        error = (packed[name] - parameter.grad).abs().max() / parameter.grad.abs().max()
        assert error < 1e-5, f"{name}: relative error {error:.3g}"


def test_gradients_match_transformers(hf_and_ours):
    """If this fails, a gradient of the gated norm, the conv, the gated attention or the delta rule differs from
    what autograd gives through transformers' model."""
    hf_model, ours, _ = hf_and_ours
    sequence = random_sequences([80], seed=13)[0]
    ours.zero_grad()
    hf_model.zero_grad()
    ids, positions, meta = pack([sequence])
    weighted_sum(ours.logits(ours.forward_hidden(ids, positions, meta)), 1).backward()
    weighted_sum(hf_model(torch.tensor([sequence])).logits[0].float(), 1).backward()
    hf_grads = {name.removeprefix("model."): parameter.grad for name, parameter in hf_model.named_parameters()}
    for name, parameter in ours.named_parameters():
        expected = hf_grads[name]
        error = (parameter.grad - expected).abs().max() / expected.abs().max().clamp_min(1e-30)
        assert error < 1e-4, f"{name}: relative error {error:.3g}"
    ours.zero_grad()
    hf_model.zero_grad()


def test_multimodal_checkpoint_loads_its_text_model(hf_and_ours, tmp_path, capsys):
    """If this fails, the text weights of a qwen3_5 checkpoint (model.language_model.*) are not mapped, or the vision
    tower / MTP head tensors are loaded or refused instead of left out with a note."""
    hf_model, ours, directory = hf_and_ours
    text_config = json.loads((directory / "config.json").read_text())
    for key in ("architectures", "tie_word_embeddings"):
        text_config.pop(key, None)
    config = {"model_type": "qwen3_5", "architectures": ["Qwen3_5ForConditionalGeneration"],
              "text_config": text_config, "vision_config": {"depth": 1, "hidden_size": 8},
              "tie_word_embeddings": False}
    tensors = {(name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name): tensor
               for name, tensor in load_file(directory / "model.safetensors").items()}
    tensors["model.visual.blocks.0.attn.qkv.weight"] = torch.zeros(24, 8)
    tensors["mtp.fc.weight"] = torch.zeros(64, 128)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_decoder(tmp_path, dtype=torch.float32)
    assert "its text model is loaded; 2 tensors (model.visual*, mtp*" in capsys.readouterr().out
    sequences = random_sequences([12, 5], seed=2)
    input_ids, positions, meta = pack(sequences)
    with torch.no_grad():
        logits = loaded.logits(loaded.forward_hidden(input_ids, positions, meta))
        expected = ours.logits(ours.forward_hidden(input_ids, positions, meta))
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)

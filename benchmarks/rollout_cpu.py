"""Rollout engine throughput on CPU: generated tokens per second over a few scheduling scenarios.

Uses the toy decoder of the tests (tests/rollout_toy_model.py) at a configurable, somewhat larger size; any model
meeting the engine's protocol can be passed to ``run_scenarios`` instead (the lead points it at the tiny pipeline).
Not a test: it prints a table and the machine it ran on.

    python benchmarks/rollout_cpu.py --hidden 128 --layers 4 --vocab 2048 --prompts 8 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
from pathlib import Path

import torch

from opdgraph.rollout import Request, RolloutEngine, SamplingParams


def scenarios(args):
    """(name, engine settings, n) tuples: plain batching, shared prompts, a starved pool, a small prefill budget."""
    longest = args.max_prompt_tokens + args.max_new_tokens
    roomy_pages = args.prompts * 4 * (longest // args.page_size + 1)
    return [
        ("n=1, roomy pool", dict(num_pages=roomy_pages, max_num_seqs=64, prefill_token_budget=512), 1),
        ("n=4 shared prompt", dict(num_pages=roomy_pages, max_num_seqs=64, prefill_token_budget=512), 4),
        ("n=4, tiny pool", dict(num_pages=2 * (longest // args.page_size + 1), max_num_seqs=64,
                                prefill_token_budget=512), 4),
        ("n=1, budget 16", dict(num_pages=roomy_pages, max_num_seqs=64, prefill_token_budget=16), 1),
    ]


def run_scenarios(model, args, vocab_size):
    rng = random.Random(0)
    lengths = [rng.randint(args.max_prompt_tokens // 4, args.max_prompt_tokens) for _ in range(args.prompts)]
    prompts = [[rng.randrange(vocab_size) for _ in range(length)] for length in lengths]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=0.95)
    header = (f"{'scenario':<20} {'tok/s':>9} {'gen tok':>8} {'prefill':>8} {'decode':>8} {'fwd':>5} "
              f"{'preempt':>7} {'peak pg':>8}")
    print(header)
    print("-" * len(header))
    for name, settings, n in scenarios(args):
        engine = RolloutEngine(model, page_size=args.page_size, device="cpu", **settings)
        requests = [Request(f"p{i}", prompt, params, n=n, seed=i) for i, prompt in enumerate(prompts)]
        engine.generate(requests[:1])  # warm-up (allocates the pool, first-call overheads)
        engine.generate(requests)
        s = engine.stats
        print(f"{name:<20} {s.tokens_per_second:>9.1f} {s.generated_tokens:>8} {s.prefill_tokens:>8} "
              f"{s.decode_tokens:>8} {s.forwards:>5} {s.preemptions:>7} {s.peak_pages_used:>8}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-prompt-tokens", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--page-size", type=int, default=16)
    # One thread by default: on a busy small machine OpenMP threads contend and the numbers swing 50x.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from rollout_toy_model import ToyConfig, ToyDecoderLM

    config = ToyConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                       num_heads=args.hidden // 32, num_kv_heads=max(1, args.hidden // 64), head_dim=32)
    model = ToyDecoderLM(config)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{args.threads}, torch {torch.__version__}")
    print(f"toy model: hidden {args.hidden}, layers {args.layers}, vocab {args.vocab}; {args.prompts} prompts of "
          f"<= {args.max_prompt_tokens} tokens, {args.max_new_tokens} new tokens, page size {args.page_size}")
    run_scenarios(model, args, args.vocab)


if __name__ == "__main__":
    main()

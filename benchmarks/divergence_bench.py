"""Benchmark of the fused full-vocabulary divergence (opdgraph.kernels.divergence) against its matmul floor.

Measures, for N positions of a Qwen2.5-1.5B student (Hs 1536, V 151,936) distilled from a Qwen2.5-7B teacher
(Ht 3584, Vt 152,064), bf16, the time (median) and extra peak memory of one loss + backward over the head:
  (a) the fused kernel, chunked (several chunk sizes; also the Triton kernel alone and its bandwidth),
  (b) a plain-torch chunked version (logits, log_softmax, analytic gradient, no autograd),
  (c) Liger-Kernel's LigerFusedLinearJSD with jsd_beta = 1 (its reverse-KL end), if liger_kernel is installed,
  (d) the matmul floor: the two logits matmuls and the two gradient matmuls alone, at the same shapes,
plus the card's measured bf16 matmul rate and a float64 correctness check on a subset of rows.
Prints a table and writes JSON (--out). Run on a GPU:  python benchmarks/divergence_bench.py --out bench.json
`--smoke` runs tiny shapes (on CPU under TRITON_INTERPRET=1 too) just to check the script end to end.
Extra memory = torch.cuda.max_memory_allocated during one call minus what was allocated before it (inputs and the
fp32 lm_head gradient buffer, which the trainer holds anyway, are in the baseline).
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

from opdgraph.kernels.divergence import _launch as launch_divergence_kernel  # the kernel without the matmuls
from opdgraph.kernels.divergence import chunked_fused_divergence, fused_divergence_chunk

GIB = 1024 ** 3


def measure(function, device, repeats):
    """(median milliseconds, extra peak bytes or None) of function() on the device."""
    function()  # warm-up: compilation, cuBLAS heuristics, allocator
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            function()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times), None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    function()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - baseline
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        function()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events), extra


def matmul_fp32_out(left, right):
    return torch.mm(left, right, out_dtype=torch.float32) if left.is_cuda else left.float() @ right.float()


def plain_torch_reverse_kl(inputs, chunk_tokens, temperature):
    """What one would write without a kernel: per chunk, fp32 logits, log_softmax, the analytic reverse-KL
    gradient, and the two gradient matmuls."""
    hidden, lm_head, teacher_hidden, teacher_lm_head, weights, lm_head_grad = inputs
    vocab = lm_head.shape[0]
    hidden_grad = torch.empty_like(hidden)
    loss = torch.zeros((), device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        logp_s = torch.log_softmax((hidden[rows] @ lm_head.t()).float() / temperature, dim=-1)
        logp_t = torch.log_softmax((teacher_hidden[rows] @ teacher_lm_head[:vocab].t()).float() / temperature, dim=-1)
        log_ratio = logp_s - logp_t
        del logp_t
        p_s = logp_s.exp()
        del logp_s
        per_token = (p_s * log_ratio).sum(-1)
        loss += (weights[rows] * per_token).sum()
        logit_grad = (p_s * (log_ratio - per_token[:, None]) * (weights[rows] / temperature)[:, None]).to(hidden.dtype)
        del p_s, log_ratio
        hidden_grad[rows] = logit_grad @ lm_head
        lm_head_grad += (logit_grad.t() @ hidden[rows]).float()
    return loss, hidden_grad


def matmul_floor(inputs, chunk_tokens):
    """The four matmuls of the fused path alone (fp32-out logits, bf16 gradient matmuls, fp32 lm_head accumulate),
    with the logits buffers reused across chunks; the gradient stands in as a bf16 copy of zeros."""
    hidden, lm_head, teacher_hidden, teacher_lm_head, _, lm_head_grad = inputs
    vocab = lm_head.shape[0]
    logit_grad = torch.zeros(min(chunk_tokens, hidden.shape[0]), vocab, dtype=hidden.dtype, device=hidden.device)

    def run():
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            student_logits = matmul_fp32_out(hidden[rows], lm_head.t())
            teacher_logits = matmul_fp32_out(teacher_hidden[rows], teacher_lm_head[:vocab].t())
            del student_logits, teacher_logits
            grad = logit_grad[: hidden[rows].shape[0]]
            grad @ lm_head
            if hidden.is_cuda:
                torch.addmm(lm_head_grad, grad.t(), hidden[rows], out_dtype=torch.float32, out=lm_head_grad)
            else:
                lm_head_grad.addmm_(grad.t().float(), hidden[rows].float())
    return run


def liger_reverse_kl(inputs, temperature):
    """LigerFusedLinearJSD(jsd_beta=1) forward + backward, or the reason it cannot run."""
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError:
        return None
    hidden, lm_head, teacher_hidden, teacher_lm_head, _, _ = inputs
    module = LigerFusedLinearJSD(jsd_beta=1.0, temperature=temperature)
    student_input = hidden.detach().requires_grad_()
    student_weight = lm_head.detach().requires_grad_()
    teacher_weight = teacher_lm_head[: lm_head.shape[0]]

    def run():
        student_input.grad = student_weight.grad = None
        module(student_input, student_weight, teacher_hidden, teacher_weight).backward()
    return run


def correctness_check(inputs, divergence, temperature, num_rows=32):
    """Relative errors of the fused chunk on num_rows rows against float64 autograd through the logits."""
    hidden, lm_head, teacher_hidden, teacher_lm_head, weights, _ = inputs
    rows = slice(0, num_rows)
    lm_head_grad = torch.zeros(lm_head.shape, dtype=torch.float32, device=hidden.device)
    loss, hidden_grad, _ = fused_divergence_chunk(
        hidden[rows], lm_head, teacher_hidden[rows], teacher_lm_head, weights[rows], divergence=divergence,
        temperature=temperature, lm_head_grad=lm_head_grad)
    hidden64 = hidden[rows].double().requires_grad_()
    lm_head64 = lm_head.double().requires_grad_()
    logp_s = torch.log_softmax(hidden64 @ lm_head64.t() / temperature, dim=-1)
    teacher_logits = teacher_hidden[rows].double() @ teacher_lm_head[: lm_head.shape[0]].double().t()
    logp_t = torch.log_softmax(teacher_logits / temperature, dim=-1)
    assert divergence == "reverse_kl", "the benchmark's reference covers reverse_kl"
    loss_ref = (weights[rows].double() * (logp_s.exp() * (logp_s - logp_t)).sum(-1)).sum()
    loss_ref.backward()

    def relative(actual, expected):
        return ((actual.double() - expected).norm() / expected.norm()).item()
    return {"loss_rel_err": abs(loss.item() - loss_ref.item()) / abs(loss_ref.item()),
            "hidden_grad_rel_err": relative(hidden_grad, hidden64.grad),
            "lm_head_grad_rel_err": relative(lm_head_grad, lm_head64.grad)}


def bf16_matmul_rate(device, size=8192):
    """Measured dense bf16 TFLOP/s of a size^3 matmul: the card's practical peak for the fraction below."""
    left = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    right = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    milliseconds, _ = measure(lambda: left @ right, device, repeats=20)
    return 2 * size ** 3 / (milliseconds * 1e-3) / 1e12


def make_inputs(args, device):
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale):
        return (torch.randn(*shape, generator=generator, device=device) * scale).to(torch.bfloat16)
    # lm_head rows scaled so the logits have std ~4, like a trained LM head, not the ~0 of a fresh init.
    hidden = randn(args.positions, args.student_hidden, scale=1.0)
    lm_head = randn(args.vocab, args.student_hidden, scale=4 / math.sqrt(args.student_hidden))
    teacher_hidden = randn(args.positions, args.teacher_hidden, scale=1.0)
    teacher_lm_head = randn(args.teacher_vocab, args.teacher_hidden, scale=4 / math.sqrt(args.teacher_hidden))
    weights = (torch.arange(args.positions, device=device) % 16 != 0).float() / args.positions  # 1/16 masked
    lm_head_grad = torch.zeros(args.vocab, args.student_hidden, dtype=torch.float32, device=device)
    return hidden, lm_head, teacher_hidden, teacher_lm_head, weights, lm_head_grad


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON results path")
    parser.add_argument("--positions", type=int, default=8192)
    parser.add_argument("--student-hidden", type=int, default=1536)
    parser.add_argument("--teacher-hidden", type=int, default=3584)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--teacher-vocab", type=int, default=152_064)
    parser.add_argument("--chunks", default="1024,2048,4096", help="comma-separated chunk sizes for (a)")
    parser.add_argument("--block-v", type=int, default=None, help="kernel vocabulary block for (a) (default 4096)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, any device: checks the script runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.positions, args.student_hidden, args.teacher_hidden, args.vocab, args.teacher_vocab = 48, 32, 48, 300, 310
        args.chunks, args.repeats = "16,64", 2
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        sys.exit("no CUDA device: run on a GPU, or pass --smoke to check the script on CPU (TRITON_INTERPRET=1)")
    divergence, temperature = "reverse_kl", args.temperature
    inputs = make_inputs(args, device)
    hidden, lm_head, teacher_hidden, teacher_lm_head, weights, lm_head_grad = inputs
    chunk_sizes = [int(chunk) for chunk in args.chunks.split(",")]
    num_positions, vocab = args.positions, args.vocab
    flops = 2 * num_positions * vocab * (3 * args.student_hidden + args.teacher_hidden)
    rows = []  # (name, milliseconds, extra bytes, note)
    rate = bf16_matmul_rate(device) if device.type == "cuda" else None

    def rate_note(milliseconds):
        return f"{flops / (milliseconds * 1e-3) / 1e12:.0f} TFLOP/s" + (
            f" = {flops / (milliseconds * 1e-3) / 1e12 / rate:.0%} of bf16 mm" if rate else "")

    for chunk in chunk_sizes:
        def fused(chunk=chunk):
            return chunked_fused_divergence(hidden, lm_head, teacher_hidden, teacher_lm_head, weights,
                                            divergence=divergence, chunk_tokens=chunk, temperature=temperature,
                                            lm_head_grad=lm_head_grad, block_v=args.block_v)
        fused_ms, fused_extra = measure(fused, device, args.repeats)
        rows.append((f"(a) fused, chunk {chunk}", fused_ms, fused_extra, rate_note(fused_ms)))
        # The Triton kernel alone on one chunk, as the fused path runs it: reads both fp32 rows twice and writes
        # the bf16 gradient once (18 bytes per logit); a vocabulary-block sweep for tuning on the first chunk size.
        chunk_rows = min(chunk, num_positions)
        student_logits = matmul_fp32_out(hidden[:chunk_rows], lm_head.t())
        teacher_logits = matmul_fp32_out(teacher_hidden[:chunk_rows], teacher_lm_head[:vocab].t())
        logit_grad = torch.empty(chunk_rows, vocab, dtype=hidden.dtype, device=device)
        block_sizes = [args.block_v] if chunk != chunk_sizes[0] or args.smoke else [2048, 4096, 8192]
        for block in block_sizes:
            def kernel_only(block=block):
                launch_divergence_kernel(student_logits, teacher_logits, logit_grad, weights[:chunk_rows],
                                         divergence=divergence, beta=0.5, temperature=temperature,
                                         sampled_ids=None, block_v=block)
            kernel_ms, _ = measure(kernel_only, device, args.repeats)
            moved = chunk_rows * vocab * (4 * 4 + logit_grad.element_size())
            rows.append((f"    kernel alone, {chunk_rows} rows, block {block or 'default'}", kernel_ms, None,
                         f"{moved / (kernel_ms * 1e-3) / 1e9:.0f} GB/s"))
        del student_logits, teacher_logits, logit_grad

    for chunk in sorted({min(chunk_sizes), 1024}):
        rows.append((f"(b) plain torch, chunk {chunk}",
                     *measure(lambda chunk=chunk: plain_torch_reverse_kl(inputs, chunk, temperature), device,
                              args.repeats), ""))
    liger = liger_reverse_kl(inputs, temperature) if device.type == "cuda" else None
    if liger is None:
        rows.append(("(c) Liger FusedLinearJSD beta=1", None, None, "not installed"))
    else:
        try:
            rows.append(("(c) Liger FusedLinearJSD beta=1", *measure(liger, device, args.repeats), ""))
        except Exception as error:  # report, do not lose the other numbers
            rows.append(("(c) Liger FusedLinearJSD beta=1", None, None, f"failed: {error}"[:120]))
    floor = {}
    for chunk in chunk_sizes:
        floor[chunk] = measure(matmul_floor(inputs, chunk), device, args.repeats)
        rows.append((f"(d) matmul floor, chunk {chunk}", *floor[chunk], rate_note(floor[chunk][0])))
    best_floor_ms = min(milliseconds for milliseconds, _ in floor.values())

    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "triton": _triton_version(), "divergence": divergence,
               "shape": {"positions": num_positions, "student_hidden": args.student_hidden,
                         "teacher_hidden": args.teacher_hidden, "vocab": vocab, "teacher_vocab": args.teacher_vocab},
               "head_tflop": flops / 1e12, "bf16_matmul_tflops": rate, "rows": [], "chunks": {}}
    print(f"device {results['device']}, {num_positions} positions, V {vocab}, Hs {args.student_hidden}, "
          f"Ht {args.teacher_hidden}, {divergence}, head {flops / 1e12:.1f} TFLOP"
          + (f", measured bf16 matmul {rate:.0f} TFLOP/s" if rate else ""))
    print(f"{'variant':44s} {'ms':>9s} {'extra GiB':>10s}  note")
    for name, milliseconds, extra, note in rows:
        ms_text = f"{milliseconds:9.2f}" if milliseconds is not None else f"{'-':>9s}"
        extra_text = f"{extra / GIB:10.2f}" if extra is not None else f"{'-':>10s}"
        print(f"{name:44s} {ms_text} {extra_text}  {note}")
        results["rows"].append({"name": name.strip(), "ms": milliseconds, "extra_bytes": extra, "note": note})
    for chunk in chunk_sizes:
        fused_ms, fused_extra = next((ms, extra) for name, ms, extra, _ in rows if name == f"(a) fused, chunk {chunk}")
        summary = {"fused_ms": fused_ms, "extra_gib": None if fused_extra is None else fused_extra / GIB,
                   "ratio_to_floor_same_chunk": fused_ms / floor[chunk][0],
                   "ratio_to_best_floor": fused_ms / best_floor_ms,
                   "fraction_of_bf16_rate": None if rate is None else flops / (fused_ms * 1e-3) / 1e12 / rate}
        results["chunks"][chunk] = summary
        print(f"chunk {chunk}: {summary['ratio_to_floor_same_chunk']:.2f}x its matmul floor, "
              f"{summary['ratio_to_best_floor']:.2f}x the best floor"
              + (f", {summary['fraction_of_bf16_rate']:.0%} of the bf16 matmul rate" if rate else "")
              + ("" if fused_extra is None else f", {fused_extra / GIB:.2f} GiB extra"))
    results["correctness"] = correctness_check(inputs, divergence, temperature)
    print("correctness vs float64 on 32 rows:", {key: f"{value:.2e}" for key, value in results["correctness"].items()})
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"wrote {args.out}")


def _triton_version():
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    main()

"""Benchmark of the fused full-vocabulary divergence (opdgraph.kernels.divergence) against its matmul floor.

Measures, for N positions of a Qwen2.5-1.5B student (Hs 1536, V 151,936) distilled from a Qwen2.5-7B teacher
(Ht 3584, Vt 152,064), bf16, the time (median) and extra peak memory of one loss + backward over the head:
  (a) the fused kernel, chunked, for a list of variants: chunk size, teacher-logit dtype (fp32, bf16), gradient
      buffer (separate bf16 buffer, or in the first half of each fp32 student row), hidden-grad split-K; also the
      Triton kernel alone per teacher dtype and gradient buffer,
  (b) a plain-torch chunked version (logits, log_softmax, analytic gradient, no autograd),
  (c) Liger-Kernel's LigerFusedLinearJSD with jsd_beta = 1 (its reverse-KL end), if liger_kernel is installed,
  (d) the matmul floor: the two logits matmuls and the two gradient matmuls alone, per chunk, teacher dtype and
      split-K (the fused variants' own floors),
then, per fused variant, its ratio to the best floor and to its own floor (same chunk, teacher dtype, split) and
PASS/FAIL against the target (<= 1.3x the best floor, <= 2 GiB extra); plus float64 checks of every variant on a
few rows and of bf16 teacher logits on a near-distilled student (where their rounding matters most).
Prints a table and writes JSON (--out). Run on a GPU:  python benchmarks/divergence_bench.py --out bench.json
`--smoke` runs tiny shapes (on CPU under TRITON_INTERPRET=1 too) just to check the script end to end.
Extra memory = torch.cuda.max_memory_allocated during one call minus what was allocated before it (inputs and the
fp32 lm_head gradient buffer, which the trainer holds anyway, are in the baseline).
"""

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time

import torch

from opdgraph.kernels.divergence import _hidden_gradient as hidden_gradient  # the fused path's own matmul
from opdgraph.kernels.divergence import _launch as launch_divergence_kernel  # the kernel without the matmuls
from opdgraph.kernels.divergence import chunked_fused_divergence, fused_divergence_chunk

GIB = 1024 ** 3
TARGET_RATIO, TARGET_EXTRA_GIB = 1.3, 2.0
TEACHER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GRAD_BUFFERS = {"separate": False, "student": True}  # value: grad_in_student_logits
# chunk:teacher logits:gradient buffer:hidden-grad splits. The baseline first, then each option alone, then
# combinations whose extra memory should stay under 2 GiB (bytes per logit: 4 student + 4 or 2 teacher + 2 or 0
# gradient; chunk 2048 x V 151,936 x 6 bytes = 1.74 GiB).
DEFAULT_VARIANTS = ("1024:fp32:separate:1,2048:fp32:separate:1,4096:fp32:separate:1,"
                    "1024:fp32:student:1,1024:fp32:separate:4,1024:fp32:student:4,1536:fp32:student:1,"
                    "1536:fp32:student:4,2048:fp32:student:4,1024:bf16:student:4,1536:bf16:student:4,"
                    "2048:bf16:separate:1,2048:bf16:student:1,2048:bf16:student:4")


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


def matmul_logits(left, right, dtype):
    """As the fused path computes logits: one rounding from the fp32 accumulator to `dtype`."""
    if not left.is_cuda:
        return (left.float() @ right.float()).to(dtype)
    return left @ right if dtype == left.dtype else torch.mm(left, right, out_dtype=dtype)


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


def matmul_floor(inputs, chunk_tokens, teacher_dtype, splits):
    """The four matmuls of the fused path alone (fp32-out student logits, teacher logits in teacher_dtype, bf16
    gradient matmuls with the hidden one split `splits` ways, fp32 lm_head accumulate); the gradient stands in as
    a bf16 copy of zeros."""
    hidden, lm_head, teacher_hidden, teacher_lm_head, _, lm_head_grad = inputs
    vocab = lm_head.shape[0]
    logit_grad = torch.zeros(min(chunk_tokens, hidden.shape[0]), vocab, dtype=hidden.dtype, device=hidden.device)

    def run():
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            student_logits = matmul_logits(hidden[rows], lm_head.t(), torch.float32)
            teacher_logits = matmul_logits(teacher_hidden[rows], teacher_lm_head[:vocab].t(), teacher_dtype)
            del student_logits, teacher_logits
            grad = logit_grad[: hidden[rows].shape[0]]
            hidden_gradient(grad, lm_head, splits)
            if hidden.is_cuda:
                torch.addmm(lm_head_grad, grad.t(), hidden[rows], out_dtype=torch.float32, out=lm_head_grad)
            else:
                lm_head_grad.addmm_(grad.t().float(), hidden[rows].float())
    return run


def liger_reverse_kl(inputs, temperature):
    """LigerFusedLinearJSD(jsd_beta=1) forward + backward, or None when liger_kernel is absent. Liger takes no
    per-position weights (shift_labels=None: every row counts, loss is the mean) and picks its own chunk size."""
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
        module(student_input, student_weight, teacher_hidden, teacher_weight, None).backward()
    return run


def relative(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm()).item()


def correctness_check(inputs, temperature, options, num_rows=32):
    """Relative errors of the fused reverse-KL chunk (with the variant's options) on num_rows rows against
    float64 autograd through the logits."""
    hidden, lm_head, teacher_hidden, teacher_lm_head, weights, _ = inputs
    rows = slice(0, num_rows)
    lm_head_grad = torch.zeros(lm_head.shape, dtype=torch.float32, device=hidden.device)
    loss, hidden_grad, _ = fused_divergence_chunk(
        hidden[rows], lm_head, teacher_hidden[rows], teacher_lm_head, weights[rows], divergence="reverse_kl",
        temperature=temperature, lm_head_grad=lm_head_grad, **options)
    hidden64 = hidden[rows].double().requires_grad_()
    lm_head64 = lm_head.double().requires_grad_()
    logp_s = torch.log_softmax(hidden64 @ lm_head64.t() / temperature, dim=-1)
    teacher_logits = teacher_hidden[rows].double() @ teacher_lm_head[: lm_head.shape[0]].double().t()
    logp_t = torch.log_softmax(teacher_logits / temperature, dim=-1)
    loss_ref = (weights[rows].double() * (logp_s.exp() * (logp_s - logp_t)).sum(-1)).sum()
    loss_ref.backward()
    return {"loss_rel_err": abs(loss.item() - loss_ref.item()) / abs(loss_ref.item()),
            "hidden_grad_rel_err": relative(hidden_grad, hidden64.grad),
            "lm_head_grad_rel_err": relative(lm_head_grad, lm_head64.grad)}


def near_distilled_check(inputs, temperature, noise=0.3, num_rows=64):
    """The case where bf16 teacher logits hurt most: a student close to its teacher (student logits = teacher
    logits + N(0, noise^2)), so D and dD/dz are small next to the logits' rounding. Relative errors of D and of
    the fp32 logit gradient against float64, with the teacher logits stored in fp32 and in bf16."""
    _, lm_head, teacher_hidden, teacher_lm_head, _, _ = inputs
    vocab, num_rows = lm_head.shape[0], min(num_rows, teacher_hidden.shape[0])
    teacher = matmul_logits(teacher_hidden[:num_rows], teacher_lm_head[:vocab].t(), torch.float32)
    generator = torch.Generator(device=teacher.device).manual_seed(1)
    student = teacher + noise * torch.randn(teacher.shape, generator=generator, device=teacher.device)
    weights = torch.ones(num_rows, device=teacher.device)
    logits64 = student.double().requires_grad_()
    logp_s = torch.log_softmax(logits64 / temperature, dim=-1)
    logp_t = torch.log_softmax(teacher.double() / temperature, dim=-1)
    divergence_ref = (logp_s.exp() * (logp_s - logp_t)).sum(-1)
    divergence_ref.sum().backward()
    result = {"mean_reverse_kl": divergence_ref.mean().item()}
    for name, dtype in TEACHER_DTYPES.items():
        grad = student.clone()
        _, per_token = launch_divergence_kernel(grad, teacher.to(dtype), grad, weights, divergence="reverse_kl",
                                                beta=0.5, temperature=temperature, sampled_ids=None, block_v=None)
        result[f"{name}_teacher_divergence_rel_err"] = relative(per_token, divergence_ref.detach())
        result[f"{name}_teacher_logit_grad_rel_err"] = relative(grad, logits64.grad)
    return result


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
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help="comma-separated chunk:teacher:grad:splits, teacher fp32|bf16, grad separate (own bf16 "
                             "[C, V]) | student (in the fp32 student rows), splits = hidden-grad split-K")
    parser.add_argument("--block-v", type=int, default=None, help="kernel vocabulary block (default 4096)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, any device: checks the script runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.positions, args.student_hidden, args.teacher_hidden, args.vocab, args.teacher_vocab = 48, 32, 48, 300, 310
        args.variants, args.repeats = "16:fp32:separate:1,16:fp32:student:4,64:bf16:student:1,64:bf16:separate:3", 2
    args.variants = [parse_variant(parser, text) for text in args.variants.split(",")]
    return args


def parse_variant(parser, text):
    """'2048:bf16:student:4' -> (2048, 'bf16', 'student', 4), or a usage error naming the bad field."""
    fields = text.split(":")
    if len(fields) != 4:
        parser.error(f"variant {text!r} is not chunk:teacher:grad:splits")
    chunk, teacher, grad_buffer, splits = fields
    for value, known in ((teacher, TEACHER_DTYPES), (grad_buffer, GRAD_BUFFERS)):
        if value not in known:
            parser.error(f"variant {text!r}: unknown choice {value!r}; choose from {', '.join(known)}")
    if not (chunk.isdigit() and splits.isdigit() and int(chunk) > 0 and int(splits) > 0):
        parser.error(f"variant {text!r}: chunk and splits must be positive integers")
    return int(chunk), teacher, grad_buffer, int(splits)


def variant_name(chunk, teacher, grad_buffer, splits):
    return f"chunk {chunk}, teacher {teacher}, grad {grad_buffer}, split {splits}"


def kernel_alone_rows(inputs, args, chunk_rows, device):
    """The Triton kernel alone on one chunk, per teacher dtype and gradient buffer (and a block sweep for the
    default layout): (name, ms, None, GB/s note). In-row runs after the first read their own gradient bytes as
    logits; only their time counts."""
    hidden, lm_head, teacher_hidden, teacher_lm_head, weights, _ = inputs
    vocab = lm_head.shape[0]
    rows = []
    for (teacher, teacher_dtype), (grad_buffer, in_row) in itertools.product(TEACHER_DTYPES.items(),
                                                                             GRAD_BUFFERS.items()):
        student_logits = matmul_logits(hidden[:chunk_rows], lm_head.t(), torch.float32)
        teacher_logits = matmul_logits(teacher_hidden[:chunk_rows], teacher_lm_head[:vocab].t(), teacher_dtype)
        logit_grad = (student_logits.view(hidden.dtype)[:, :vocab] if in_row
                      else torch.empty(chunk_rows, vocab, dtype=hidden.dtype, device=device))
        default_layout = teacher == "fp32" and grad_buffer == "separate"
        blocks = [2048, 4096, 8192] if default_layout and not args.smoke and args.block_v is None else [args.block_v]
        for block in blocks:
            def kernel_only(block=block):
                launch_divergence_kernel(student_logits, teacher_logits, logit_grad, weights[:chunk_rows],
                                         divergence="reverse_kl", beta=0.5, temperature=args.temperature,
                                         sampled_ids=None, block_v=block)
            # Two sweeps over both rows plus one gradient write.
            moved = chunk_rows * vocab * (2 * (4 + teacher_logits.element_size()) + logit_grad.element_size())
            name = f"    kernel alone, {chunk_rows} rows, teacher {teacher}, grad {grad_buffer}, block {block or 'def'}"
            try:
                kernel_ms, _ = measure(kernel_only, device, args.repeats)
                rows.append((name, kernel_ms, None, f"{moved / (kernel_ms * 1e-3) / 1e9:.0f} GB/s"))
            except Exception as error:  # report, do not lose the other numbers
                rows.append((name, None, None, f"failed: {error}"[:160]))
        del student_logits, teacher_logits, logit_grad
    return rows


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        sys.exit("no CUDA device: run on a GPU, or pass --smoke to check the script on CPU (TRITON_INTERPRET=1)")
    temperature = args.temperature
    inputs = make_inputs(args, device)
    hidden, lm_head, teacher_hidden, teacher_lm_head, weights, lm_head_grad = inputs
    num_positions, vocab = args.positions, args.vocab
    flops = 2 * num_positions * vocab * (3 * args.student_hidden + args.teacher_hidden)
    rate = bf16_matmul_rate(device) if device.type == "cuda" else None
    rows = []  # (name, milliseconds, extra bytes, note) for the detail table

    def rate_note(milliseconds):
        return f"{flops / (milliseconds * 1e-3) / 1e12:.0f} TFLOP/s" + (
            f" = {flops / (milliseconds * 1e-3) / 1e12 / rate:.0%} of bf16 mm" if rate else "")

    fused = {}  # (chunk, teacher, grad buffer, splits) -> (ms, extra bytes) of the variants that ran
    correctness = {}
    for variant in args.variants:
        chunk, teacher, grad_buffer, splits = variant
        options = {"teacher_logits_dtype": TEACHER_DTYPES[teacher],
                   "grad_in_student_logits": GRAD_BUFFERS[grad_buffer], "hidden_grad_splits": splits}
        name = f"(a) fused, {variant_name(*variant)}"

        def run(chunk=chunk, options=options):
            return chunked_fused_divergence(hidden, lm_head, teacher_hidden, teacher_lm_head, weights,
                                            divergence="reverse_kl", chunk_tokens=chunk, temperature=temperature,
                                            lm_head_grad=lm_head_grad, block_v=args.block_v, **options)
        try:
            fused[variant] = measure(run, device, args.repeats)
            rows.append((name, *fused[variant], rate_note(fused[variant][0])))
            if variant[1:] not in correctness:  # the options, not the chunk, change the arithmetic
                correctness[variant[1:]] = correctness_check(inputs, temperature, options)
        except Exception as error:  # report, do not lose the other numbers
            rows.append((name, None, None, f"failed: {error}"[:160]))
    chunk_sizes = sorted({variant[0] for variant in args.variants})
    rows += kernel_alone_rows(inputs, args, min(args.variants[0][0], num_positions), device)

    for chunk in sorted({min(chunk_sizes), 1024}):
        rows.append((f"(b) plain torch, chunk {chunk}",
                     *measure(lambda chunk=chunk: plain_torch_reverse_kl(inputs, chunk, temperature), device,
                              args.repeats), ""))
    liger = liger_reverse_kl(inputs, temperature) if device.type == "cuda" else None
    liger_name = "(c) Liger FusedLinearJSD beta=1"
    if liger is None:
        rows.append((liger_name, None, None, "not installed" if device.type == "cuda" else "needs CUDA"))
    else:
        try:
            rows.append((liger_name, *measure(liger, device, args.repeats), "unweighted mean, its own chunking"))
        except Exception as error:  # report, do not lose the other numbers
            rows.append((liger_name, None, None, f"failed: {error}"[:160]))
    floor = {}  # (chunk, teacher, splits) -> (ms, extra bytes)
    for chunk, teacher, _, splits in args.variants:
        name = f"(d) matmul floor, chunk {chunk}, teacher {teacher}, split {splits}"
        if (chunk, teacher, splits) in floor:
            continue
        try:
            floor[chunk, teacher, splits] = measure(matmul_floor(inputs, chunk, TEACHER_DTYPES[teacher], splits),
                                                    device, args.repeats)
            rows.append((name, *floor[chunk, teacher, splits], rate_note(floor[chunk, teacher, splits][0])))
        except Exception as error:  # report, do not lose the other numbers
            rows.append((name, None, None, f"failed: {error}"[:160]))
    fused = {variant: result for variant, result in fused.items() if (variant[0], variant[1], variant[3]) in floor}
    best_floor_key = min(floor, key=lambda key: floor[key][0])
    best_floor_ms = floor[best_floor_key][0]

    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "triton": _triton_version(), "divergence": "reverse_kl",
               "shape": {"positions": num_positions, "student_hidden": args.student_hidden,
                         "teacher_hidden": args.teacher_hidden, "vocab": vocab, "teacher_vocab": args.teacher_vocab},
               "head_tflop": flops / 1e12, "bf16_matmul_tflops": rate, "rows": [], "variants": {},
               "best_floor": {"chunk": best_floor_key[0], "teacher": best_floor_key[1], "splits": best_floor_key[2],
                              "ms": best_floor_ms},
               "target": {"max_ratio_to_best_floor": TARGET_RATIO, "max_extra_gib": TARGET_EXTRA_GIB}}
    print(f"device {results['device']}, {num_positions} positions, V {vocab}, Hs {args.student_hidden}, "
          f"Ht {args.teacher_hidden}, reverse_kl, head {flops / 1e12:.1f} TFLOP"
          + (f", measured bf16 matmul {rate:.0f} TFLOP/s" if rate else ""))
    print(f"{'variant':80s} {'ms':>8s} {'extra GiB':>9s}  note")
    for name, milliseconds, extra, note in rows:
        ms_text = f"{milliseconds:8.2f}" if milliseconds is not None else f"{'-':>8s}"
        extra_text = f"{extra / GIB:9.2f}" if extra is not None else f"{'-':>9s}"
        print(f"{name:80s} {ms_text} {extra_text}  {note}")
        results["rows"].append({"name": name.strip(), "ms": milliseconds, "extra_bytes": extra, "note": note})

    print(f"\ntarget: <= {TARGET_RATIO}x the best floor ({best_floor_ms:.2f} ms: chunk {best_floor_key[0]}, teacher "
          f"{best_floor_key[1]}, split {best_floor_key[2]}) = {TARGET_RATIO * best_floor_ms:.2f} ms, and <= "
          f"{TARGET_EXTRA_GIB} GiB extra")
    print(f"{'fused variant':48s} {'ms':>8s} {'GiB':>6s} {'x best':>7s} {'x own':>6s}  verdict")
    passing = []
    for (chunk, teacher, grad_buffer, splits), (milliseconds, extra) in fused.items():
        name = variant_name(chunk, teacher, grad_buffer, splits)
        extra_gib = None if extra is None else extra / GIB
        ratio_best, ratio_own = milliseconds / best_floor_ms, milliseconds / floor[chunk, teacher, splits][0]
        failures = ([] if ratio_best <= TARGET_RATIO else ["time"]) + (
            [] if extra_gib is not None and extra_gib <= TARGET_EXTRA_GIB else ["memory"])
        verdict = "PASS" if not failures else "FAIL (" + ", ".join(failures) + ")"
        if not failures:
            passing.append((milliseconds, name))
        gib_text = f"{extra_gib:6.2f}" if extra_gib is not None else f"{'-':>6s}"
        print(f"{name:48s} {milliseconds:8.2f} {gib_text} {ratio_best:7.2f} {ratio_own:6.2f}  {verdict}")
        results["variants"][name] = {
            "chunk": chunk, "teacher_logits": teacher, "grad_buffer": grad_buffer, "hidden_grad_splits": splits,
            "ms": milliseconds,
            "extra_gib": extra_gib, "ratio_to_best_floor": ratio_best, "ratio_to_own_floor": ratio_own,
            "fraction_of_bf16_rate": None if rate is None else flops / (milliseconds * 1e-3) / 1e12 / rate,
            "verdict": verdict}
    if passing:
        milliseconds, name = min(passing)
        print(f"PASS: {len(passing)} variant(s) meet the target; fastest: {name}, {milliseconds:.2f} ms")
    else:
        print("FAIL: no fused variant meets both the time and the memory target")
    results["pass"] = bool(passing)

    results["correctness"] = {f"teacher {teacher}, grad {grad_buffer}, split {splits}": errors
                              for (teacher, grad_buffer, splits), errors in correctness.items()}
    print("\ncorrectness vs float64 on 32 rows (random logits, student far from teacher):")
    for name, errors in results["correctness"].items():
        print(f"  {name:42s}", {key: f"{value:.2e}" for key, value in errors.items()})
    try:
        results["near_distilled"] = near_distilled_check(inputs, temperature)
    except Exception as error:  # report, do not lose the other numbers
        results["near_distilled"] = {"failed": str(error)[:160]}
    print("near-distilled student (logits = teacher + N(0, 0.3^2)), kernel vs float64:",
          {key: f"{value:.2e}" if isinstance(value, float) else value
           for key, value in results["near_distilled"].items()})
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

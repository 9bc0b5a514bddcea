#!/usr/bin/env bash
# The GPU checks and benchmarks of one device session, part by part, each under its own time limit, every log and
# JSON written to $OUT (default ./gpu_out). Usage: bash benchmarks/gpu_suite.sh tests attn rollout step memory qwen35tests
# Parts:
# - setup: install the carried .whl wheels into /tmp/site (put it on PYTHONPATH) and the project; stash or join the
#   GGUF parts (benchmarks/gguf_parts.sh).
# - prune: pipelines/prune_distill.toml with its before/after eval (needs the joined GGUF).
# - tests: GPU-marked tests of the rollout, kernels and runtime fast paths.
# - attn: the decode attention kernel vs flashinfer.
# - rollout: decode bursts vs the per-step graphs and transformers, with a profile.
# - step: one OPD step, shapes A and B, TRL on shape A.
# - memory: predicted vs measured memory: tiny pipeline, releases on vs off.
# - multi: 2 GPUs vs 1, equivalence and shape-B throughput (needs 2 GPUs; MULTI_ARGS adds options).
# - alltests: the whole suite with CUDA visible (GPU-marked tests run, kernel tests compile).
# - tpprobe: what a 2-way tensor-parallel rollout would cost (the small all-reduces on 2 GPUs; burst decode of the
#   full model vs one GPU's half of it, the heads and the MLP split in two).
# - qwen35tests: Qwen3.5's GPU tests, with their durations.
# - qwen35bench: the fla core vs the torch core, decode and one OPD step beside Qwen3 (benchmarks/qwen35_gpu.py).
# - qwen35memory: `run --record-memory` of the Qwen3.5 pair at the shape of memory_families.py, predicted vs measured.
# - decodevariants: issue 19's rollout levers side by side (the decode-attention kernel sweep, then every variant at
#   bs 64/128/256 x 1024 new tokens with roofline %, a profile of the baseline and the fastest; their GPU tests).
# - trainkernels: the training forward's variants side by side, shape B (torch vs Liger-Kernel layer kernels, K/V
#   repeated vs native GQA, regional torch.compile), with the layer-kernel and attention tests compiled.
# The benchmarks run on GPU 0 unless they need two.
set -o pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TOKENIZERS_PARALLELISM=false
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
# Single-GPU parts see one GPU (TRL's trainer refuses to run with several visible); multi sets its own.
SINGLE=${CUDA_VISIBLE_DEVICES:-0}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"

# fla-core holds the Qwen3.5 kernels (fla.ops, fla.modules) and imports einops (pure Python; no network there).
qwen35_fla_path() {
  if ! python3 -c "import fla.ops.gated_delta_rule" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site-fla .whl/fla_core-*.whl .whl/einops-*.whl \
      && export PYTHONPATH=/tmp/site-fla${PYTHONPATH:+:$PYTHONPATH}
  fi
}

for part in "$@"; do
  started=$(date +%s)
  case $part in
    setup)  # the carried wheels (.whl) into /tmp/site, the project on top, the GGUF part this call carries
      if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
      fi
      python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1
      bash benchmarks/gguf_parts.sh join ;;
    prune)  # the layer-pruned recipe with eval before and after: its degeneration figures (needs the joined GGUF)
      timeout 300 python3 -m opdgraph run pipelines/prune_distill.toml --set pipeline.device=cuda --set log.progress=false \
        --set "pipeline.output_dir=\"/tmp/prune_run\"" 2>&1 | tee "$OUT/prune_distill.txt" | tail -32 ;;
    tests)
      CUDA_VISIBLE_DEVICES=$SINGLE timeout 110 python3 -m pytest -q -rs tests/test_kernel_paged_decode.py tests/test_kernel_fused_decode.py \
        tests/test_rollout_gpu.py -k "burst or paged or fused or stacked" -s 2>&1 | tee "$OUT/gpu_tests.txt" \
        | grep -E "passed|failed|agreement|FAILED|Error" | tail -25 ;;
    alltests)  # the whole suite where CUDA is: GPU-marked tests, and kernels compiled (CI interprets them)
      timeout 580 python3 -m pytest -q -rs 2>&1 | tee "$OUT/gpu_tests_all.txt" | tail -15 ;;
    attn)
      CUDA_VISIBLE_DEVICES=$SINGLE timeout 120 python3 benchmarks/decode_attention_bench.py --out "$OUT/decode_attention.json" 2>&1 \
        | tee "$OUT/decode_attention.txt" | tail -40 ;;
    rollout)
      (cd benchmarks && CUDA_VISIBLE_DEVICES=$SINGLE timeout 200 python3 rollout_gpu.py --only "bursts,transformers,flashinfer + graphs bs128" \
        --profile --out "$OUT/rollout_gpu.json" 2>&1 | tee "$OUT/rollout_gpu.txt" | tail -50) ;;
    step)
      (cd benchmarks && CUDA_VISIBLE_DEVICES=$SINGLE timeout 270 python3 step.py --out "$OUT/step.json" 2>&1 | tee "$OUT/step.txt" | tail -22) ;;
    memory)
      (cd benchmarks && CUDA_VISIBLE_DEVICES=$SINGLE timeout 130 python3 step.py --shapes A --no-trl --releases-off-compare \
        --out "$OUT/releases.json" 2>&1 | tee "$OUT/releases.txt" | tail -20)
      CUDA_VISIBLE_DEVICES=$SINGLE timeout 80 python3 -m opdgraph run pipelines/tiny.toml --record-memory --set pipeline.device=cuda \
        --set "pipeline.output_dir=\"$OUT/tiny_run\"" 2>&1 | tail -20 > "$OUT/tiny_memory.txt"
      cp "$OUT/tiny_run/memory.txt" "$OUT/tiny_memory_table.txt"
      rm -rf "$OUT/tiny_run" ;;
    multi)
      timeout 560 python3 benchmarks/multi_gpu.py --time-budget 540 $MULTI_ARGS --out "$OUT/multi_gpu.json" 2>&1 \
        | tee "$OUT/multi_gpu.txt" | tail -30 ;;
    tpprobe)
      timeout 100 torchrun --standalone --nproc-per-node 2 benchmarks/allreduce_probe.py 2>&1 | tee "$OUT/allreduce.txt" | tail -4
      (cd benchmarks && for shapes in full half; do
        set -- ; [ $shapes = half ] && set -- --config-set num_attention_heads=6 --config-set num_key_value_heads=1 \
          --config-set intermediate_size=4480 --config-set head_dim=128
        CUDA_VISIBLE_DEVICES=$SINGLE timeout 150 python3 rollout_gpu.py --only "bursts16 bs" --batch-sizes 64,128 \
          --skip-transformers "$@" --out "$OUT/rollout_$shapes.json" 2>&1 | tee "$OUT/rollout_$shapes.txt" | tail -8
      done) ;;
    qwen35tests)  # Qwen3.5's GPU tests (the first calls compile fla's Triton kernels: minutes, hence the limit)
      # (a cold H100 ran past 290 s, 134 s warm)
      qwen35_fla_path
      python3 -c "from opdgraph.kernels.fla_linear_attention import linear_backend_description as d; print(d('cuda'))" \
        | tee "$OUT/qwen35_backend.txt"
      CUDA_VISIBLE_DEVICES=$SINGLE timeout ${QWEN35_TESTS_S:-420} python3 -m pytest -q -rs --durations=12 \
        tests/test_qwen35_fla.py tests/test_qwen35_gpu.py 2>&1 | tee "$OUT/qwen35_gpu_tests.txt" | tail -25 ;;
    qwen35bench)  # the fla core vs the torch core, decode and one OPD step beside Qwen3 (QWEN35_PARTS picks)
      qwen35_fla_path
      CUDA_VISIBLE_DEVICES=$SINGLE timeout ${QWEN35_BENCH_S:-400} python3 benchmarks/qwen35_gpu.py \
        --parts "${QWEN35_PARTS:-step,decode,core}" --out "$OUT/qwen35_gpu.json" > "$OUT/qwen35_gpu_log.txt" 2>&1
      tail -3 "$OUT/qwen35_gpu_log.txt"; cat "$OUT/qwen35_gpu.txt" ;;
    qwen35memory)  # run --record-memory of the Qwen3.5 pair at the memory issue's shape (benchmarks/memory_families.py)
      # (a cold machine compiles fla's kernels first: the pair then takes 260 s and more, 80 s warm)
      qwen35_fla_path
      CUDA_VISIBLE_DEVICES=$SINGLE timeout ${QWEN35_MEMORY_S:-360} python3 benchmarks/memory_families.py --pairs qwen35 \
        --steps 2 --out "$OUT/memory_qwen35.json" 2>&1 | tee "$OUT/memory_qwen35_log.txt" | tail -14 ;;
    decodevariants)
      CUDA_VISIBLE_DEVICES=$SINGLE timeout 100 python3 -m pytest -q -rs tests/test_kernel_paged_decode.py \
        tests/test_kernel_burst_state.py tests/test_kernel_fused_decode.py tests/test_rollout_gpu.py \
        -k "bf16 or float32 or burst or slots or advance or packed or stacked" -s 2>&1 \
        | tee "$OUT/decode_variants_tests.txt" | grep -E "passed|failed|agreement|FAILED|Error" | tail -25
      (cd benchmarks && CUDA_VISIBLE_DEVICES=$SINGLE timeout 240 python3 decode_variants.py --profile \
        --out "$OUT/decode_variants.json" 2>&1 | tee "$OUT/decode_variants.txt" | tail -60) ;;
    trainkernels)
      python3 -c "import liger_kernel.ops" 2>/dev/null || python3 -m pip install -q --no-deps .whl/liger_kernel-*.whl
      CUDA_VISIBLE_DEVICES=$SINGLE timeout 150 python3 -m pytest -q -rs tests/test_layer_kernels.py tests/test_varlen_attention.py \
        2>&1 | tee "$OUT/train_kernels_tests.txt" | tail -4
      (cd benchmarks && CUDA_VISIBLE_DEVICES=$SINGLE timeout 420 python3 step.py --shapes B --no-trl --steps 1 \
        --variants "${TRAIN_VARIANTS:-before,torch,liger,compile}" --out "$OUT/train_kernels.json" 2>&1 \
        | tee "$OUT/train_kernels.txt" | tail -16) ;;
    *) echo "unknown part $part" ;;
  esac
  echo "part $part took $(( $(date +%s) - started )) s" | tee -a "$OUT/timings.txt"
done

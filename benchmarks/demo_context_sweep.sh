# Device sweep of the context-distillation demo's learning rate (one warm H200; the GGUF arrives in two parts:
# benchmarks/gguf_parts.sh says how). Keeps each run's metrics and
# eval samples under $OUT/<lr>/. Usage: bash benchmarks/demo_context_sweep.sh LR...
set -o pipefail; export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
bash benchmarks/gguf_parts.sh join || exit 1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for lr in "$@"; do
  start=$(date +%s)
  timeout 280 python3 -m opdgraph run pipelines/demo.toml --set step.lr=$lr --set pipeline.output_dir=/tmp/runs/lr$lr \
    --set log.progress=false > /tmp/runs-lr$lr.log 2>&1; echo "lr $lr rc $? wall $(( $(date +%s) - start )) s"
  mkdir -p $OUT/lr$lr && cp /tmp/runs/lr$lr/metrics.jsonl /tmp/runs/lr$lr/samples.jsonl $OUT/lr$lr/ && tail -10 /tmp/runs-lr$lr.log
done

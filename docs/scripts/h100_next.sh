#!/usr/bin/env bash
# The device run planned for the next session (issue 5 / 6), ordered so that each step's results
# are on disk before the next starts and a time limit loses only the tail:
#   1. bf16 eager vs compiled with regional compilation (compile time ~1/3 of whole steps on CPU),
#      streaming included (first-chunk latency), profile of every stage;
#   2. the onnx backend on this host's CPU provider next to eager (issue 6's H100 row);
#   3. with the time left, whole-step compilation for comparison.
# Usage: bash docs/scripts/h100_next.sh OUT_DIR     (repository root, on the GPU machine)
set -u -o pipefail
OUT=${1:?output folder}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor
PY="python3 -m cosytools"
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, onnxruntime; print(torch.__version__, onnxruntime.__version__)"; } > "$OUT/gpu.txt"
[ -d /tmp/cv3-full ] || timeout 120 $PY init-model --preset full /tmp/cv3-full
B="--model /tmp/cv3-full --device cuda --speech-tokens 250 --prompt-seconds 3 --text-tokens 60"
timeout 300 $PY -v bench --backend eager --backend compiled $B --dtype bf16 --warmup 1 --repeat 3 --stream \
  --option regional=true --option flow_dynamic=true --profile "$OUT/prof" --json "$OUT/bf16_regional.json" \
  2>&1 | grep -v -i warn | tee "$OUT/bf16_regional.txt"
timeout 120 $PY -v bench --backend eager --backend onnx $B --dtype float32 --warmup 1 --repeat 2 \
  --json "$OUT/onnx_cpu_provider.json" 2>&1 | grep -v -i warn | tee "$OUT/onnx.txt"
LEFT=$(( ${DEADLINE:-540} - SECONDS ))
[ $LEFT -gt 120 ] && timeout $LEFT $PY -v bench --backend compiled $B --dtype bf16 --warmup 1 --repeat 3 \
  --json "$OUT/bf16_whole.json" 2>&1 | grep -v -i warn | tee "$OUT/bf16_whole.txt"

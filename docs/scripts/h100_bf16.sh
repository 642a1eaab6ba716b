#!/usr/bin/env bash
# bf16 benchmark of eager vs compiled on the device tool's H100, with a per-stage profile.
# Usage (repository root, on the GPU machine): bash docs/scripts/h100_bf16.sh OUT_DIR [extra bench args]
# The inductor cache lives in .cache/inductor (git-ignored): a second call on a still-warm
# machine reuses the compiled kernels.
set -u -o pipefail
OUT=${1:?output folder}; shift
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 COSYTOOLS_DEBUG=1 TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor
PY="python3 -m cosytools"
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, onnxruntime; print(torch.__version__, onnxruntime.__version__)"; } > "$OUT/gpu.txt"
[ -d /tmp/cv3-full ] || timeout 120 $PY init-model --preset full /tmp/cv3-full
timeout ${BENCH_TIMEOUT:-420} $PY -v bench --backend eager --backend compiled --model /tmp/cv3-full --device cuda --dtype bf16 \
  --speech-tokens 250 --prompt-seconds 3 --text-tokens 60 --warmup 1 --repeat 3 \
  --profile "$OUT/prof" --json "$OUT/bench.json" "$@" 2>&1 | grep -v Warning | tee "$OUT/log.txt"
# with the time left (DEADLINE seconds from the start, default 520): the fixture dumps through the
# compiled backend in bf16 on the GPU (tolerances: parity/metrics.py, bfloat16 table)
F=.gpu/fixtures/cv3-tiny
LEFT=$(( ${DEADLINE:-520} - SECONDS ))
if [ -d $F ] && [ $LEFT -gt 60 ]; then
  timeout $LEFT $PY parity run $F/refs --model $F/model --backend compiled --device cuda --dtype bf16 \
    > "$OUT/parity_compiled_bf16.txt" 2>&1
  tail -18 "$OUT/parity_compiled_bf16.txt"
fi

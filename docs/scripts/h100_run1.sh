#!/usr/bin/env bash
# Device run: bf16 eager vs compiled with regional compilation (streaming included: first-chunk
# latency; profile of every stage), then the onnx backend on the host's CPU provider beside eager
# float32 (issue 6's H100 row).  Every step has its own time limit so a slow one loses only itself;
# at most 8 files come back, so logs and profile tables are packed at the end.
# Usage: bash docs/scripts/h100_run1.sh OUT_DIR   (repository root, on the GPU machine)
set -u -o pipefail
OUT=${1:?output folder}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor
PY="python3 -m cosytools"
W=/tmp/run; mkdir -p "$OUT" $W
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, onnxruntime; print(torch.__version__, onnxruntime.__version__)"; nproc; } > $W/gpu.txt
[ -d /tmp/cv3-full ] || timeout 120 $PY init-model --preset full /tmp/cv3-full > /dev/null
B="--model /tmp/cv3-full --device cuda --speech-tokens 250 --prompt-seconds 3 --text-tokens 60"
timeout ${T1:-330} $PY -v bench --backend eager --backend compiled $B --dtype bf16 --warmup 1 --repeat 2 --stream \
  --option regional=true ${OPTS:-} --profile $W/prof --json "$OUT/bf16_regional.json" \
  2>&1 | grep -v -i warn | tee $W/bf16_regional.txt
timeout ${T2:-200} $PY -v bench --backend eager --backend onnx $B --dtype float32 --warmup 1 --repeat 1 \
  --json "$OUT/onnx_cpu_provider.json" 2>&1 | grep -v -i warn | tee $W/onnx.txt
tar czf "$OUT/logs.tgz" -C $W . 2>/dev/null
du -sh .cache/inductor 2>/dev/null
tar czf /tmp/ind.tgz .cache/inductor 2>/dev/null && [ $(stat -c %s /tmp/ind.tgz) -lt 16000000 ] && cp /tmp/ind.tgz "$OUT/inductor_cache.tgz"
ls -la "$OUT"

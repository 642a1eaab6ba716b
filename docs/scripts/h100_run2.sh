#!/usr/bin/env bash
# Device run: eager bf16 baseline, then the compiled backend in bf16 with regional compilation,
# TF32 for the float32 HiFT convolutions, streaming (first-chunk latency) and a profile of each
# stage — two bench invocations in the same call on the same card (eager's streaming run alone
# took minutes in the first attempt, so eager is timed without --stream).
# Usage: bash docs/scripts/h100_run2.sh OUT_DIR   (repository root, on the GPU machine)
set -u -o pipefail
OUT=${1:?output folder}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor
PY="python3 -m cosytools"
W=/tmp/run; mkdir -p "$OUT" $W
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, onnxruntime; print(torch.__version__, onnxruntime.__version__)"; nproc; } > $W/gpu.txt
[ -d /tmp/cv3-full ] || timeout 120 $PY init-model --preset full /tmp/cv3-full > /dev/null
B="--model /tmp/cv3-full --device cuda --speech-tokens 250 --prompt-seconds 3 --text-tokens 60 --dtype bf16"
timeout ${T1:-100} $PY -v bench --backend eager $B --warmup 1 --repeat 2 --json "$OUT/bf16_eager.json" \
  2>&1 | grep -v -i warn | tee $W/bf16_eager.txt
timeout ${T2:-340} $PY -v bench --backend compiled $B --warmup 1 --repeat 3 --stream \
  --option regional=true --option tf32=true --option flow_dynamic=true ${OPTS:-} \
  --profile $W/prof --json "$OUT/bf16_compiled_regional.json" 2>&1 | grep -v -i warn | tee $W/bf16_compiled.txt
tar czf "$OUT/logs.tgz" -C $W . 2>/dev/null
ls -la "$OUT"

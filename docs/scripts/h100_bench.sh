#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md, as run through the device tool on one H100.
# Usage (repo root, fixtures copied to .gpu/fixtures): bash docs/scripts/h100_bench.sh OUT_DIR [parts]
# parts: any of env,eager,compiled,bf16,parity (default: all)
set -u
OUT=${1:-/tmp/out}; PARTS=${2:-env,eager,compiled,bf16,parity}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 COSYTOOLS_CACHE=/tmp/ctcache TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
CT="python3 -m cosytools"
has() { [[ ",$PARTS," == *",$1,"* ]]; }
if has env; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
  python3 -c "import torch,onnxruntime;print('torch',torch.__version__,'cuda',torch.version.cuda,'ort',onnxruntime.__version__)" | tee -a "$OUT/env.txt"
  ( time $CT init-model --preset full /tmp/cv3-full ) 2>&1 | tail -4 | tee -a "$OUT/env.txt"
fi
B="--model /tmp/cv3-full --device cuda --speech-tokens 250 --prompt-seconds 3 --text-tokens 60 --warmup 1 --repeat 3"
if has eager; then
  timeout 300 $CT bench --backend eager $B --dtype float32 --stream --json "$OUT/eager_fp32.json" 2>&1 | tee "$OUT/eager_fp32.txt"
fi
if has compiled; then
  timeout 540 $CT bench --backend eager --backend compiled $B --dtype float32 --stream --check-parity \
    --json "$OUT/compiled_fp32.json" 2>&1 | tail -40 | tee "$OUT/compiled_fp32.txt"
fi
if has bf16; then
  timeout 540 $CT bench --backend eager --backend compiled $B --dtype bf16 --check-parity \
    --json "$OUT/compiled_bf16.json" 2>&1 | tail -40 | tee "$OUT/compiled_bf16.txt"
fi
if has parity; then
  F=.gpu/fixtures/cv3-tiny
  for be in eager compiled; do
    timeout 300 $CT parity run $F/refs --model $F/model --backend $be --device cuda 2>&1 | tail -20 | tee "$OUT/parity_$be.txt"
  done
fi

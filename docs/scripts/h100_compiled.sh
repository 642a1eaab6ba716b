#!/usr/bin/env bash
# Second H100 pass of docs/benchmarks.md: compiled vs eager on the full model, then fixture parity.
set -u
OUT=${1:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 COSYTOOLS_CACHE=/tmp/ctcache TORCHINDUCTOR_CACHE_DIR=/tmp/inductor COSYTOOLS_DEBUG=1
CT="python3 -m cosytools"
( time $CT init-model --preset full /tmp/cv3-full ) > "$OUT/init.txt" 2>&1
B="--model /tmp/cv3-full --device cuda --speech-tokens 250 --prompt-seconds 3 --text-tokens 60 --warmup 1 --repeat 3"
timeout 280 $CT bench --backend eager --backend compiled $B --dtype float32 --check-parity --option exact_sampling=true \
  --json "$OUT/compiled_fp32.json" > "$OUT/compiled_fp32.txt" 2>&1 || {
  echo "== retry without CUDA graphs" >> "$OUT/compiled_fp32.txt"
  timeout 200 $CT bench --backend eager --backend compiled $B --dtype float32 --option cuda_graphs=false \
    --json "$OUT/compiled_nograph_fp32.json" >> "$OUT/compiled_fp32.txt" 2>&1; }
tail -45 "$OUT/compiled_fp32.txt"
F=.gpu/fixtures/cv3-tiny
timeout 60 $CT parity run $F/refs --model $F/model --backend eager --device cuda > "$OUT/parity_eager.txt" 2>&1; tail -3 "$OUT/parity_eager.txt"
timeout 200 $CT parity run $F/refs --model $F/model --backend compiled --device cuda > "$OUT/parity_compiled.txt" 2>&1; tail -20 "$OUT/parity_compiled.txt"

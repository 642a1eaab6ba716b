#!/usr/bin/env bash
# The device run planned for the next session (issue 5), each step with its own limit, results
# written as they finish; carry .gpu (the tiny fixtures):
#   1. the CUDA-only tests (compiled backend: graphs, device sampling, half precision, the new
#      whole-call HiFT graph) — never run yet for the HiFT graph;
#   2. fixture parity of the regional inductor build on the GPU, bf16 (TF32 HiFT) and float32
#      (parity run now compiles each part once per folder; the last attempt timed out at 90 s);
#   3. eager bf16 + compiled bf16 --stream in one call (the HiFT graph is new: flow + HiFT target
#      40 ms, was 46), then the same with 64-frame flow buckets (650 frames pad to 704, not 768).
# Usage: bash docs/scripts/h100_next.sh OUT_DIR     (repository root, on the GPU machine)
set -u -o pipefail
OUT=${1:?output folder}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor COSYTOOLS_FIXTURES=$PWD/.gpu/fixtures
PY="python3 -m cosytools"
W=/tmp/run; mkdir -p "$OUT" $W
F=.gpu/fixtures/cv3-tiny
timeout 120 $PY init-model --preset full /tmp/cv3-full > /dev/null 2>&1 &
INIT=$!
timeout ${T0:-150} python3 -m pytest -q -x tests/test_compiled.py -k cuda -p no:cacheprovider > $W/cuda_tests.txt 2>&1; tail -3 $W/cuda_tests.txt
COSYTOOLS_COMPILED=tf32=true timeout ${T1:-150} $PY parity run $F/refs --model $F/model --backend compiled --device cuda \
  --dtype bf16 > $W/parity_compiled_bf16.txt 2>&1; tail -3 $W/parity_compiled_bf16.txt
timeout ${T2:-120} $PY parity run $F/refs --model $F/model --backend compiled --device cuda --dtype float32 \
  > $W/parity_compiled_fp32.txt 2>&1; tail -3 $W/parity_compiled_fp32.txt
wait $INIT
B="--model /tmp/cv3-full --device cuda --speech-tokens 250 --prompt-seconds 3 --text-tokens 60 --dtype bf16"
timeout ${T3:-60} $PY -v bench --backend eager $B --warmup 1 --repeat 2 --json "$OUT/bf16_eager.json" 2>&1 \
  | grep -v -i warn > $W/bf16_eager.txt
timeout ${T4:-170} $PY -v bench --backend compiled $B --warmup 1 --repeat 3 --stream --option tf32=true \
  --json "$OUT/bf16_compiled.json" 2>&1 | grep -v -i warn | tee $W/bf16_compiled.txt | grep -v "^INFO"
FB=$(seq -s: 64 64 1024):1280:1536:2048:3072
timeout ${T5:-120} $PY -v bench --backend compiled $B --warmup 1 --repeat 3 --option tf32=true \
  --option flow_buckets=$FB --json "$OUT/bf16_compiled_buckets64.json" 2>&1 | grep -v -i warn \
  | tee $W/bf16_buckets64.txt | grep -v "^INFO"
tar czf "$OUT/logs.tgz" -C $W . 2>/dev/null
ls -la "$OUT"

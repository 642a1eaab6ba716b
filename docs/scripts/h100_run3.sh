#!/usr/bin/env bash
# Device run: (1) the fixture dumps through the compiled backend on the GPU (regional inductor,
# bf16 with TF32 HiFT convs, then float32 IEEE); (2) the onnx backend on this host's CPU provider
# beside eager float32 on the GPU (issue 6's H100 row); (3) compiled bf16 streaming with static
# flow buckets and the high-priority chunk stream (first-chunk latency).
# Usage: bash docs/scripts/h100_run3.sh OUT_DIR   (repository root, on the GPU machine; carry .gpu)
set -u -o pipefail
OUT=${1:?output folder}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor
PY="python3 -m cosytools"
W=/tmp/run; mkdir -p "$OUT" $W
F=.gpu/fixtures/cv3-tiny
timeout 120 $PY init-model --preset full /tmp/cv3-full > /dev/null 2>&1 &
INIT=$!
COSYTOOLS_COMPILED=regional=true,tf32=true timeout ${T1:-90} $PY parity run $F/refs --model $F/model \
  --backend compiled --device cuda --dtype bf16 > $W/parity_compiled_bf16.txt 2>&1; tail -4 $W/parity_compiled_bf16.txt
COSYTOOLS_COMPILED=regional=true timeout ${T2:-80} $PY parity run $F/refs --model $F/model \
  --backend compiled --device cuda --dtype float32 > $W/parity_compiled_fp32.txt 2>&1; tail -4 $W/parity_compiled_fp32.txt
wait $INIT
B="--model /tmp/cv3-full --device cuda --speech-tokens 250 --prompt-seconds 3 --text-tokens 60"
timeout ${T3:-180} $PY -v bench --backend eager --backend onnx $B --dtype float32 --warmup 1 --repeat 1 \
  --json "$OUT/onnx_cpu_provider.json" 2>&1 | grep -v -i warn | tee $W/onnx.txt | grep -v "^INFO"
timeout ${T4:-200} $PY -v bench --backend compiled $B --dtype bf16 --warmup 1 --repeat 3 --stream \
  --option regional=true --option tf32=true ${OPTS:-} --json "$OUT/bf16_compiled_stream.json" 2>&1 \
  | grep -v -i warn | tee $W/bf16_stream.txt | grep -v "^INFO"
tar czf "$OUT/logs.tgz" -C $W . 2>/dev/null
ls -la "$OUT"

#!/usr/bin/env bash
# The checks only a CUDA machine can make, as one run (a few minutes on an H100 or H200):
#   1. xformers equals SDPA on CUDA: the attention kernels, then a whole model (plain and packed
#      forward passes, cached decoding), tests/test_attention.py and tests/test_model.py;
#   2. the training-step MFU of the 350M model in bf16 with SDPA, then xformers, then SDPA with
#      compiled layers (bench/train_step.py; goal: >= 45% on an H100);
#   3. decoding throughput on the GPU (bench/decode.py).
#
# It uses the machine's own python3 and torch, with this checkout on PYTHONPATH: nothing is
# installed but wheels put in .whl/ (xformers, say; see bench/RESULTS.md, "GPU"). Each step has
# its own time limit, and a failed step does not stop the others. The log also goes to
# $OUT/gpu.log when OUT is set.
#
#     bash bench/gpu.sh
#     PEAK_TFLOPS=989 BATCH=8 SEQ=2048 STEPS=10 PRESET=350M bash bench/gpu.sh   # the defaults
#     DEVICE=cpu PRESET=debug BATCH=1 SEQ=128 STEPS=2 TOKENS=8 PYTHON=.venv/bin/python bash bench/gpu.sh  # a dry run
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-350M}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}  # H100/H200 SXM, dense bf16
BATCH=${BATCH:-8}
SEQ=${SEQ:-2048}
STEPS=${STEPS:-10}
TOKENS=${TOKENS:-256}  # decoded per row
LOG=${OUT:-/tmp}/gpu.log
: >"$LOG"

say() { echo "== $*" | tee -a "$LOG"; }
step() {  # step SECONDS DESCRIPTION COMMAND...: run with a time limit, log it, never stop the script
  local limit=$1 what=$2
  shift 2
  say "$what"
  PYTHONUNBUFFERED=1 timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || say "exit $rc: $what"
}

if compgen -G ".whl/*.whl" >/dev/null; then
  say "installing .whl/*.whl into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tee -a "$LOG"
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

step 60 "machine" sh -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; \
  $PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name())'; \
  $PY -c 'from interleaf.model.attention import xformers_problem as p; print(\"xformers:\", p(\"$DEVICE\") or \"runs\")'"
step 300 "xformers equals SDPA on CUDA" "$PY" -m pytest -q -p no:cacheprovider -rs \
  tests/test_attention.py tests/test_model.py -k "cuda or xformers"
common=(--device "$DEVICE" --dtype bfloat16 --preset "$PRESET" --batch "$BATCH" --seq "$SEQ" --steps "$STEPS"
        --peak-tflops "$PEAK_TFLOPS")
step 300 "train step, $PRESET bf16, sdpa" "$PY" bench/train_step.py "${common[@]}" --backend sdpa
step 300 "train step, $PRESET bf16, xformers" "$PY" bench/train_step.py "${common[@]}" --backend xformers --no-hf
step 400 "train step, $PRESET bf16, sdpa, compiled layers" "$PY" bench/train_step.py "${common[@]}" --backend sdpa --compile
step 300 "decoding" "$PY" bench/decode.py --device "$DEVICE" --threads 0 --tokens "$TOKENS"
say "done: $LOG"

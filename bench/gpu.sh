#!/usr/bin/env bash
# The checks only a CUDA machine can make, as one run (about 8 minutes on an H100 or H200):
#   1. the machine: GPU, torch, the packages the checks need, whether xformers runs and which
#      of its kernels it picks for a bf16 training pass;
#   2. xformers equals SDPA on CUDA: the attention kernels (bf16, with gradients) and a whole
#      model (plain and packed passes, cached decoding), tests/test_attention.py, test_model.py;
#   3. the training-step MFU of the 350M model in bf16 with SDPA, then xformers, then SDPA with
#      compiled layers (bench/train_step.py; goal: >= 45% on an H100);
#   4. decoding throughput on the GPU in bf16 (bench/decode.py), then eager against the compiled
#      decode step (static shapes, CUDA graphs: `--compile`) in one run, with a check that both
#      draw the same greedy tokens;
#   5. parallel image decoding (image_parallel K) on a small model trained in the run: forward
#      passes per image and codes/s for each K against the one-token-per-step bound.
#
# It uses the machine's own python3 and torch, with this checkout on PYTHONPATH: nothing is
# installed but wheels put in .whl/ (xformers, say; see bench/RESULTS.md, "GPU"). Each step has
# its own time limit, cut to what is left of DEADLINE seconds for the whole run (so a command
# limit of 600 s still sees the summary); a failed step does not stop the others. The log also
# goes to $OUT/gpu.log when OUT is set.
#
#     bash bench/gpu.sh
#     PEAK_TFLOPS=989 BATCH=8 SEQ=2048 STEPS=10 PRESET=350M DEADLINE=570 bash bench/gpu.sh   # the defaults
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
DEADLINE=${DEADLINE:-570}
LOG=${OUT:-/tmp}/gpu.log
: >"$LOG"
failed=()

say() { echo "== $*" | tee -a "$LOG"; }
step() {  # step SECONDS DESCRIPTION COMMAND...: run within its limit and the deadline, log it, go on
  local what=$2 limit=$1 left=$((DEADLINE - SECONDS))
  shift 2
  ((left < limit)) && limit=$left
  if ((limit < 20)); then
    say "skipped (deadline): $what"
    failed+=("$what (skipped)")
    return
  fi
  say "$what (limit ${limit} s, ${SECONDS} s in)"
  PYTHONUNBUFFERED=1 timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" != 0 ]; then
    say "exit $rc$( [ "$rc" = 124 ] && echo ' (time limit)'): $what"
    failed+=("$what")
  fi
}

if compgen -G ".whl/*.whl" >/dev/null; then
  say "installing .whl/*.whl into /tmp/site"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl 2>&1 | tee -a "$LOG"; then
    export PYTHONPATH=/tmp/site
  else
    say "the wheels did not install: the xformers steps will say why they cannot run"
    failed+=("wheels")
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

step 90 "machine" "$PY" - "$DEVICE" <<'EOF'
import importlib, subprocess, sys

import torch

device = sys.argv[1]
if device == "cuda":
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip())
    print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
missing = []
for name in ("pytest", "transformers", "safetensors", "tokenizers", "yaml", "tqdm", "PIL", "xformers"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '')}")
    except Exception as e:
        missing.append(name)
        print(f"{name}: missing ({type(e).__name__}: {e})")
from interleaf.model.attention import xformers_problem

problem = xformers_problem(device)
print("xformers:", problem or "runs")
if problem is None and device == "cuda":  # which kernels a bf16 packed training pass of head_dim 64 gets
    try:
        from xformers.ops import fmha
        from xformers.ops.fmha import dispatch

        q = torch.zeros(1, 4096, 16, 64, device="cuda", dtype=torch.bfloat16)
        bias = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens([2048, 2048], device="cuda")
        inp = fmha.common.Inputs(q, q, q, bias)
        print("xformers forward:", dispatch._dispatch_fw(inp, True).NAME, "backward:", dispatch._dispatch_bw(inp, None).NAME)
    except Exception as e:  # private API: the names are a diagnosis, not a check
        print(f"xformers kernel names unknown ({type(e).__name__}: {e})")
sys.exit(1 if [m for m in missing if m != "xformers"] else 0)
EOF
step 240 "xformers equals SDPA on CUDA" "$PY" -m pytest -q -p no:cacheprovider -rs \
  tests/test_attention.py tests/test_model.py -k "cuda or xformers"
common=(--device "$DEVICE" --dtype bfloat16 --preset "$PRESET" --batch "$BATCH" --seq "$SEQ" --steps "$STEPS"
        --peak-tflops "$PEAK_TFLOPS")
step 120 "train step, $PRESET bf16, sdpa" "$PY" bench/train_step.py "${common[@]}" --backend sdpa
step 90 "train step, $PRESET bf16, xformers" "$PY" bench/train_step.py "${common[@]}" --backend xformers --no-hf
step 120 "decoding, bf16" "$PY" bench/decode.py --device "$DEVICE" --dtype bfloat16 --threads 0 --tokens "$TOKENS" \
  --only text
step 180 "decoding, bf16, eager vs compiled step" "$PY" bench/decode.py --device "$DEVICE" --dtype bfloat16 \
  --threads 0 --tokens "$TOKENS" --compile --no-hf --repeats 2 --batches 1 --only text
step 240 "train step, $PRESET bf16, sdpa, compiled layers" "$PY" bench/train_step.py "${common[@]}" --backend sdpa \
  --compile --no-hf
step 150 "parallel image decoding, bf16, a 30M model trained in the run" "$PY" bench/decode.py --device "$DEVICE" \
  --dtype bfloat16 --threads 0 --only images --image-dim 512 --image-layers 8
if ((${#failed[@]})); then
  say "done in ${SECONDS} s; failed: $(IFS=';'; echo "${failed[*]}")"
else
  say "done in ${SECONDS} s, every step passed: $LOG"
fi

#!/usr/bin/env bash
# The GPU checks of issue 14 as one command on the device machine, from the repository root:
#
#   here:   python benchmarks/gpu_kit.py prepare
#   there:  device run, carry [".gpu-kit"], command "bash benchmarks/gpu_session.sh", timeout_s 560
#
# Every phase has its own time limit and the next one runs whatever the last one did; what each
# printed lands in $OUT (inventory.txt, pytest-cuda.log, bench.log, results.md, results.jsonl).
# SHAPE (default 1.7b), STEPS (4), BATCH (8), MAX_LENGTH (512) pick the benchmark's job; PHASES
# ("tests bench") which of phases 2 and 3 run, e.g. PHASES=bench to rerun only the benchmark.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
SHAPE=${SHAPE:-1.7b}
STEPS=${STEPS:-4}
BATCH=${BATCH:-8}
MAX_LENGTH=${MAX_LENGTH:-512}
PYTHON=${PYTHON:-python3}
PHASES=${PHASES:-tests bench}

# 1. The carried wheels (benchmarks/gpu_kit.py): installed outside the image, first on the path.
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu-kit/wheels/*.whl \
  > "$OUT/install.log" 2>&1 || echo "pip install of .gpu-kit/wheels failed (see install.log)" | tee -a "$OUT/inventory.txt"
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PYTHON" --version
  "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
  timeout 60 "$PYTHON" benchmarks/gpu_kit.py inventory
} >> "$OUT/inventory.txt" 2>&1

# 2. The tests that only run on CUDA (FlexAttention's gradients, the engine's FlexAttention path against
#    the plain computation, the 4-bit base quantised onto the GPU), with the rest of their files.
[[ " $PHASES " == *" tests "* ]] && { timeout 180 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_packed_attention.py tests/test_logprobs_engine.py \
  tests/test_quantization.py \
  > "$OUT/pytest-cuda.log" 2>&1
echo "pytest exit $?" >> "$OUT/pytest-cuda.log"; }

# 3. preftune vs TRL (and TRL + Liger-Kernel) on the GPU, side by side in one invocation; only the
#    rows whose packages import.
[[ " $PHASES " == *" bench "* ]] || exit 0
runs="preftune preftune-cached"
"$PYTHON" -c 'import trl, datasets' 2>/dev/null && runs="trl-default $runs"
"$PYTHON" -c 'import trl, datasets, liger_kernel' 2>/dev/null && runs="$runs trl-liger"
"$PYTHON" -c 'import bitsandbytes' 2>/dev/null && runs="$runs preftune-4bit"
echo "bench rows: $runs" > "$OUT/bench.log"
timeout 330 "$PYTHON" benchmarks/bench_dpo_vs_trl.py --no-scaling --base-model .gpu-kit/smollm2 --model-shape "$SHAPE" \
  --steps "$STEPS" --batch-size "$BATCH" --max-length "$MAX_LENGTH" --runs $runs --results "$OUT/results.md" \
  >> "$OUT/bench.log" 2>&1
echo "bench exit $?" >> "$OUT/bench.log"

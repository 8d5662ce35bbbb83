#!/usr/bin/env bash
# The benchmark on a GPU machine, as one prepared run (e.g. through the device tool):
#   bash scripts/gpu_bench.sh                        # results under $OUT (or benchmarks/gpu)
#   bash scripts/gpu_bench.sh --runner-workers 1 2 4 # only the runner-worker sweep
# With BentoML installed it runs the whole harness (the runner and the baseline pick CUDA fp16 by
# themselves); without it (a bare GPU image), only the in-process bare-model limit and
# preprocessing fidelity. Scenarios are time-bound (BENCH_SECONDS each), not count-bound: a GPU
# answers the CPU run's 400 requests in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir=${OUT:-benchmarks/gpu}
mkdir -p "$out_dir"
python=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out_dir/gpu.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Nothing is downloaded: the harness builds its own random-weight model.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 BENTOML_DO_NOT_TRACK=true PYTHONUNBUFFERED=1
# Decoding and resizing happen in the API workers: give them the machine's cores (the GPU does
# the model), leaving some for the runner and the load generator.
export CLIP_API_WORKERS=${CLIP_API_WORKERS:-$(($(nproc) / 2))}
"$python" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device visible"'
if "$python" -c 'import bentoml' 2>/dev/null; then
  "$python" scripts/bench.py --out "$out_dir" --max-seconds "${BENCH_SECONDS:-8}" \
    --max-requests 1000000 "$@" 2>&1 | tee "$out_dir/bench.log"
else
  echo "bentoml is not installed here: measuring the bare model only" | tee "$out_dir/bench.log"
  "$python" scripts/bench.py --bare-only --out "$out_dir" 2>&1 | tee -a "$out_dir/bench.log"
fi

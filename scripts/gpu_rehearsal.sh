#!/usr/bin/env bash
# The GPU run's software stack, rehearsed on this CPU machine before a lent GPU's minutes go to it.
#   bash scripts/gpu_rehearsal.sh            # 17 minutes here from scratch: a 5.5 GB venv,
#                                            # pytest, then scripts/bench.py --gpu-targets
# A lent GPU machine runs the 'cuda' image's Python and packages (Python 3.12, torch 2.11, numpy
# 2.5, numba 0.68: its gpu.txt, benchmarks/gpu/h200-2026-12-04/) with the wheels that
# scripts/gpu_wheels.sh carries installed over them, while development and CI run Python 3.11
# and torch 2.13. This builds a venv with the image's versions of what the wheels leave out,
# installs the carried wheels over it as scripts/gpu_bench.sh does (--target, first on the path),
# and runs the test suite (bar the Docker image's test) and the GPU harness on the CPU in it, so a
# code or wheel that breaks on that stack shows here, not in the device's minutes. What it cannot
# show: anything CUDA does (PyPI's torch is a CUDA build; here it runs on the CPU).
case "${1:-}" in -h | --help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${REHEARSAL_DIR:-/tmp/gpu-rehearsal}
python312=${PYTHON312:-python3.12}
if ! "$python312" -V > /dev/null 2>&1; then
  # pyenv installs 3.12 beside the default without putting it on the path (its shim refuses).
  python312=$(ls -d "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1)
  [[ -n "$python312" ]] || { echo "no Python 3.12 found: set PYTHON312" >&2; exit 1; }
fi
[[ -x "$dir/venv/bin/python" ]] || "$python312" -m venv "$dir/venv"
python="$dir/venv/bin/python"
# The image's own builds of what scripts/gpu_wheels.sh leaves out of the wheels (nvidia-ml-py is
# BentoML's pynvml), then the tests' tools and boto3 (the wheels leave it out; the tests use it).
"$python" -m pip install -q torch==2.11.0 torchvision==0.26.0 numpy==2.5.2 numba==0.68.0 \
  nvidia-ml-py pyyaml regex pygments hf_xet
"$python" -m pip install -q -r requirements-dev.txt boto3
bash scripts/gpu_wheels.sh
rm -rf "$dir/site"
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$dir/site" \
  .whl/*.whl
ln -sf "$dir/site/bin/bentoml" "$dir/venv/bin/bentoml"  # the tests start `<venv>/bin/bentoml`
export PYTHONPATH="$dir/site:$PWD" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export BENTOML_DO_NOT_TRACK=true PYTHONUNBUFFERED=1
"$python" -c 'import platform, torch, numpy, numba
print("python", platform.python_version(), "torch", torch.__version__, "numpy", numpy.__version__,
      "numba", numba.__version__)'
"$python" -m pytest -q -p no:cacheprovider --ignore=tests/test_container.py
# The GPU machine has no pytest: the harness runs here without it too (a pytest that cannot
# be imported first on the path, for every process it starts).
mkdir -p "$dir/no-pytest"
echo 'raise ImportError("no pytest: the GPU machine has none")' > "$dir/no-pytest/pytest.py"
PYTHONPATH="$dir/no-pytest:$PYTHONPATH" \
  "$python" scripts/bench.py --out "$dir/smoke" --max-seconds 8 --max-requests 1000000 --gpu-targets \
  2>&1 | tee "$dir/smoke.log"
"$python" -c 'import json, sys
stages = json.load(open(sys.argv[1]))
errors = stages.get("stage_errors", {})
print(len(stages["stage_seconds"]), "harness stages,", len(errors), "failed:", *errors)
sys.exit(1 if errors else 0)' "$dir/smoke/gpu-targets.json"

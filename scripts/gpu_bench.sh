#!/usr/bin/env bash
# The GPU targets as one prepared run on a GPU machine (through the device tool). On an H200
# (2026-12-04) its stages took about 10 minutes: a first run of 480 s and a resumed one (below).
#   bash scripts/gpu_wheels.sh                      # here, once: wheels for the GPU image (.whl)
#   bash scripts/gpu_bench.sh                       # there (carry .whl): every GPU target
#   bash scripts/gpu_bench.sh --runner-workers 1 2  # or any other scripts/bench.py mode
# With no arguments it runs `scripts/bench.py --gpu-targets` with the DEFAULT settings (the service
# picks API workers, runner workers and batch limits from the machine), targets first: the bare fp16
# image and text encoders; the seed request at 1, 32 and 64 clients and uncached /embed_texts on all
# cores but the load generator's four; the seed request at 64 clients with the whole server on 4
# cores; each of those two servers' 64 clients once more under py-spy (scripts/gil_profile.py: the
# share of time each process held its GIL, and where); the device resize against Pillow pixel for
# pixel, every preprocessing path's fidelity (Pillow in the runner, the default, and the opt-in
# nvJPEG included), what the thread waiting for each pass replayed from CUDA graphs costs the CPU
# asleep (the default) and polling, and the runner's decode of a batch of forwarded JPEGs into
# pinned memory with queued copies (the default) against pageable memory, queued and waited for,
# and against Pillow decoding without simplejpeg (CPU per image, wall per batch), and the bare
# encoder replayed from CUDA graphs against plain passes. Then the ablations, each the seed request at 64 clients, the
# defaults still open first: CLIP_RUNNER_PASSES=2 (one pass's Pillow decode beside the other's
# forward pass), CLIP_DECODE=api (the other exact path), CLIP_API_WORKERS=3 and
# CLIP_RUNNER_WORKERS=1 on the 4 cores, CLIP_RUNNER_CALLS=3 (the calls-in-flight rule),
# CLIP_CUDA_WAIT=spin on the 4 cores (the runner's threads polling the GPU),
# CLIP_SWITCH_INTERVAL_MS=0.2 (the GIL handed over after 0.2 ms, not 5); then what the first run
# settled or an opt-in only shows: CLIP_RUNNER_JPEG_DECODER=nvjpeg (the opt-in),
# CLIP_CUDA_GRAPHS=off (at 1 client too), CLIP_ACCESS_LOG=on on the 4 cores; one runner
# called both ways, alternating (the wire format of CLIP_DIRECT_RUNNER_CALLS against BentoML's
# client), and last, in a process of its own, what nvJPEG makes of forwarded JPEGs with broken coded
# data (scripts/broken_jpegs.py: an answer where Pillow refuses, other pixels, a broken device, an
# intact neighbour's pixels changed in its batch). Each server and each in-process measurement is a
# stage, saved as it ends with its duration, so a run cut short keeps what it measured; a failed
# stage is recorded and the next one runs.
# Results go to $OUT (or benchmarks/gpu): gpu-targets.json, bench.log, gpu.txt, gpu-util.csv,
# and py-spy's raw stacks (py-spy-all-server-cores.txt, py-spy-server-on-4-cores.txt).
# A run cut short or with failed stages is finished on a machine of its kind by a second run that
# measures only those stages and merges its results (copy the first gpu-targets.json into the
# tree so that it travels with it):
#   bash scripts/gpu_bench.sh --gpu-targets --resume benchmarks/gpu/gpu-targets.json
# The bench stops itself after BENCH_TIMEOUT_S seconds (480), servers shut down and finished
# stages kept; give the device tool's timeout_s BENCH_TIMEOUT_S + 120 (90 for the wheels' install
# and the version check before it, 30 for the shutdown after it): 600 for the default. Set-up
# beyond its 90 s comes out of the bench's seconds, so the whole still ends inside that limit.
# For a resume set it to what the device has left, less those 120. BENCH_SECONDS (8) is each
# scenario's measuring window.
# Back on the development machine, with the results in benchmarks/gpu/gpu-targets.json:
#   .venv/bin/python scripts/bench.py --gpu-report benchmarks/gpu/gpu-targets.json  # BENCHMARKS.md
case "${1:-}" in -h | --help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir=${OUT:-benchmarks/gpu}
mkdir -p "$out_dir"
python=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out_dir/gpu.txt"
# Which CPUs share a core: the server's 4 confined cores and the load generator's 4 may be
# hyperthread siblings of the others' (the 4-core figures then have less than 4 cores).
lscpu -e=CPU,CORE,SOCKET,NODE 2>&1 | tee -a "$out_dir/gpu.txt" || true
if [[ -d .whl ]]; then  # carried wheels: install beside the image's own torch
  # A resumed run on the same (still warm) machine keeps the first call's install.
  wheels=$(ls .whl | sha1sum)
  started=$SECONDS
  if [[ "$(cat /tmp/site/.clip-wheels 2>/dev/null)" != "$wheels" ]]; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    # Their bytecode, once, on every core (7 s on 2 cores here). Installed without it, each
    # server process would compile every module it imports from source at each start wherever
    # PYTHONDONTWRITEBYTECODE is set (it is on this project's development machine): about 1 s
    # of CPU for an API worker and 2 s for a runner worker, measured here, in each of the run's
    # dozen server starts.
    "$python" -m compileall -q -j 0 /tmp/site > /dev/null ||
      echo "compileall: some modules did not compile (they compile when imported, as before)"
    echo "$wheels" > /tmp/site/.clip-wheels
    echo "wheels installed and compiled in $((SECONDS - started)) s" | tee -a "$out_dir/gpu.txt"
  else
    echo "wheels as installed by an earlier call" | tee -a "$out_dir/gpu.txt"
  fi
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/site/bin:$PATH"  # py-spy
fi
# The tree's own modules too (the tree travels as source).
"$python" -m compileall -q -j 0 clip_runner service.py scripts > /dev/null || true
echo "PYTHONDONTWRITEBYTECODE=${PYTHONDONTWRITEBYTECODE:-unset}" | tee -a "$out_dir/gpu.txt"
# Whether this machine resolves its own name at once. BentoML's supervisor (circus's Arbiter)
# calls socket.getfqdn() before it starts any worker; where the name is in no /etc/hosts and the
# DNS server it names cannot be reached (a lent machine that reaches nothing), that waits out
# the resolver's timeouts at every server start. On the first H200 run no runner touched the
# GPU until 33-42 s after its server was started (gpu-util.csv), on 12 cores and on 4 alike. A
# Docker container has its own name in /etc/hosts (Docker writes it), so where
# the lookup is slow here the name is added for the run, and gpu.txt says so.
fqdn_seconds() {
  timeout 30 "$python" -c 'import socket, time
started = time.monotonic()
socket.getfqdn()
print(f"{time.monotonic() - started:.2f}")' || echo "30+"
}
name=$("$python" -c 'import socket; print(socket.gethostname())')  # no `hostname` binary needed
looked_up=$(fqdn_seconds)
echo "socket.getfqdn() of $name: $looked_up s" | tee -a "$out_dir/gpu.txt"
if [[ "$looked_up" == "30+" ]] || awk -v s="$looked_up" 'BEGIN { exit !(s > 1) }'; then
  if echo "127.0.0.1 $name" >> /etc/hosts 2>/dev/null; then
    echo "its name added to /etc/hosts for the run: now $(fqdn_seconds) s" | tee -a "$out_dir/gpu.txt"
  else
    echo "/etc/hosts not writable: every server start waits that long" | tee -a "$out_dir/gpu.txt"
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Nothing is downloaded: the harness builds its own random-weight model.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 BENTOML_DO_NOT_TRACK=true PYTHONUNBUFFERED=1
"$python" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device visible"'
"$python" -c 'import torchvision.io' || echo "torchvision missing: the device path decodes with Pillow"
# What the figures were measured with (the image's own numba and numpy among them), and whether
# the API workers' resize compiles with that numba (if not they resize with Pillow: same pixels,
# more CPU per request). gVisor reports kernel 4.4.0 and does not enforce CPU affinity.
{
  echo "kernel $(uname -r)"
  "$python" - <<'EOF'
import importlib
import platform

print("python", platform.python_version())
names = ("torch", "torchvision", "numpy", "numba", "PIL", "simplejpeg", "transformers", "bentoml")
for name in names:
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        print(name, "not importable:", type(exc).__name__, exc)
from clip_runner.images import compiled_resample

print("numba resize compiled:", compiled_resample.COMPILED)
from clip_runner.model import simplejpeg_pixels

print("simplejpeg decodes to Pillow's pixels:", simplejpeg_pixels.AGREES)
# The supervisor and the API workers pick the GPU defaults by this check, without torch.
import torch
from clip_runner.cuda_check import cuda_available

agree = cuda_available() == torch.cuda.is_available()
print("GPU seen without torch (cuda_check):", cuda_available(), "" if agree else
      "- DISAGREES with torch: the API workers run with the CPU defaults")
EOF
} 2>&1 | tee -a "$out_dir/gpu.txt"
args=("$@")
[[ ${#args[@]} -gt 0 ]] || args=(--gpu-targets)
# The GPU's utilisation and memory once a second while the bench runs, to tell a server the
# CPUs hold back (the GPU idle) from one the GPU does; bench.log gives each stage's start time.
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 1 \
  > "$out_dir/gpu-util.csv" 2>&1 &
sampler=$!
trap 'kill "$sampler" 2>/dev/null || true' EXIT
# SIGINT before the device tool's own limit: the bench then stops its servers (their own
# sessions would outlive a kill and skew a resumed run on the same machine) and keeps every
# stage it finished (see BENCH_TIMEOUT_S above).
setup_overrun=$(( SECONDS > 90 ? SECONDS - 90 : 0 ))
bench_s=$(( ${BENCH_TIMEOUT_S:-480} - setup_overrun ))
echo "set-up took ${SECONDS} s: the bench gets ${bench_s} s" | tee -a "$out_dir/gpu.txt"
(( bench_s > 0 )) || exit 1  # past the device tool's limit already: nothing would finish
timeout -s INT -k 30 "$bench_s" \
  "$python" scripts/bench.py --out "$out_dir" --max-seconds "${BENCH_SECONDS:-8}" \
  --max-requests 1000000 "${args[@]}" 2>&1 | tee "$out_dir/bench.log"

#!/usr/bin/env bash
# Proves the SageMaker image on a real Docker engine, from nothing:
#   1. Docker engine (installs docker.io and starts dockerd when absent; needs root then);
#   2. a local Debian base image (debootstrap + docker import; no registry is needed), with the
#      host's CA bundle so builds behind a TLS-inspecting proxy can reach PyPI;
#   3. a bento with the tiny model (and a CPU torch wheel when one is at hand, so the image build
#      does not pull the multi-GB CUDA build; torchvision is then left out, as PyPI's is built for
#      CUDA torch), `bentoml containerize`d on that base; torch (and torchvision, where the image
#      carries it) must load in the image and decode a JPEG;
#   4. `docker run IMAGE serve` on 8080: /ping, the seed's /invocations, bad input, non-root user,
#      model inside the image, a killed runner started again (the next /invocations a 200 within
#      120 s); the same checks with no network at all (`--network none`, checked
#      from inside with `docker exec`) and a CPU quota of one core (`--cpus 1`: the runner must
#      run one pass of one thread); SIGTERM stops it within 30 s;
#   5. /opt/ml/model (what SageMaker extracts ModelDataUrl's model.tar.gz into): a mounted CLIP
#      checkpoint is served instead of the baked-in model (its embedding checked against
#      transformers on the host), an empty mount (SageMaker SDK local mode) keeps the baked-in
#      one, and a directory holding something else stops the start with a clear message;
#   6. `bentoctl build` of the same bento with this project's operator (bentoctl/sagemaker-operator,
#      bentoctl from .venv-bentoctl: `make bentoctl`), stopped before the ECR push (--dry-run:
#      no AWS here); its image must be the one `bentoml containerize` built (same image ID).
# Cleans up the containers (and the test image, unless KEEP_IMAGE=1); exits non-zero on any failure.
#
#   sudo scripts/container_test.sh        # about 4 minutes the first time, 2 when cached
#
# Settings (environment): BASE_IMAGE (default clip-local/python-base:bookworm, built if missing),
# TORCH_WHEEL (a CPU torch wheel to bundle; default: the newest /opt/wheels/torch-*+cpu*.whl;
# `pypi`: none, the release requirements as they are: CUDA torch and torchvision from PyPI, GBs),
# KEEP_IMAGE=1, PYTHON (default .venv/bin/python; `make` creates it).
case "${1:-}" in -h | --help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
set -Eeuo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
BASE_IMAGE="${BASE_IMAGE:-clip-local/python-base:bookworm}"
ROOTFS_IMAGE="clip-local/debian-rootfs:bookworm"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
BENTOML="$(dirname "$PYTHON")/bentoml"
WORK="$(mktemp -d -t clip-container-test.XXXXXX)"
RUN_ID="$(date +%s)-$$"
IMAGE="clip-bentoml-test:$RUN_ID"
CONTAINERS=()
BENTO_TAG=""
BENTOCTL="${BENTOCTL:-$REPO/.venv-bentoctl/bin/bentoctl}"
STARTED_DOCKERD=""
export DOCKER_BUILDKIT=0 BENTOML_HOME="$WORK/bentoml" BENTOML_DO_NOT_TRACK=true

log() { printf '[container_test %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
fail() { log "FAILED: $*"; exit 1; }

cleanup() {
  local status=$?
  for container in "${CONTAINERS[@]}"; do docker rm -f "$container" >/dev/null 2>&1 || true; done
  if [[ -z "${KEEP_IMAGE:-}" ]]; then docker rmi -f "$IMAGE" >/dev/null 2>&1 || true; fi
  if [[ -n "$BENTO_TAG" ]]; then
    docker rmi "clip-sagemaker-$BENTO_TAG" >/dev/null 2>&1 || true  # what bentoctl tagged
  fi
  if [[ -n "$STARTED_DOCKERD" ]]; then
    # Another run on this machine may have found this engine and be using it: leave it then.
    if [[ -z "$(docker ps -aq 2>/dev/null)" ]]; then kill "$STARTED_DOCKERD" 2>/dev/null || true
    else log "leaving dockerd running: other containers use it"; fi
  fi
  rm -rf "$WORK"
  if [[ $status -eq 0 ]]; then log "all checks passed"; else log "exit status $status"; fi
}
trap cleanup EXIT

ensure_docker() {
  if docker info >/dev/null 2>&1; then return; fi
  [[ $EUID -eq 0 ]] || fail "no running Docker engine, and installing/starting one needs root"
  if ! command -v dockerd >/dev/null; then
    log "installing docker.io"
    apt-get update -qq && apt-get install -y -qq docker.io >/dev/null
  fi
  log "starting dockerd (no bridge, no iptables: containers use host networking)"
  # TMPDIR=/tmp: the engine outlives this run when another run uses it, and runc keeps files in
  # the engine's TMPDIR (a test's temporary folder, deleted later, would break `docker exec`).
  TMPDIR=/tmp dockerd --bridge=none --iptables=false >"$WORK/dockerd.log" 2>&1 &
  STARTED_DOCKERD=$!
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && return; sleep 1; done
  tail -20 "$WORK/dockerd.log" >&2
  fail "dockerd did not start"
}

ensure_base_image() {
  if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then return; fi
  [[ "$BASE_IMAGE" == clip-local/* ]] || fail "base image $BASE_IMAGE not found"
  if ! docker image inspect "$ROOTFS_IMAGE" >/dev/null 2>&1; then
    [[ $EUID -eq 0 ]] || fail "building the Debian root filesystem (debootstrap) needs root"
    command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null
    log "debootstrap bookworm (minbase) -> $ROOTFS_IMAGE"
    debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian \
      >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log" >&2; fail "debootstrap"; }
    tar -C "$WORK/rootfs" -c . | docker import - "$ROOTFS_IMAGE" >/dev/null
    rm -rf "$WORK/rootfs"
  fi
  log "building $BASE_IMAGE (python3 + the host's CA bundle)"
  mkdir -p "$WORK/base"
  cp /etc/ssl/certs/ca-certificates.crt "$WORK/base/host-ca-bundle.crt"
  cat >"$WORK/base/Dockerfile" <<EOF
FROM $ROOTFS_IMAGE
ENV DEBIAN_FRONTEND=noninteractive
# What BentoML's generated Dockerfile expects of a Debian base, installed once here.
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    python3-pip ca-certificates gnupg2 bash build-essential curl && rm -rf /var/lib/apt/lists/*
# The host's CA bundle (with any TLS-inspecting proxy's CA) for pip and uv during the build.
COPY host-ca-bundle.crt /etc/ssl/certs/host-ca-bundle.crt
ENV SSL_CERT_FILE=/etc/ssl/certs/host-ca-bundle.crt \
    PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/host-ca-bundle.crt \
    PIP_BREAK_SYSTEM_PACKAGES=1
EOF
  docker build --network host -q -t "$BASE_IMAGE" "$WORK/base" >/dev/null
}

build_image() {
  [[ -x "$PYTHON" ]] || make -s .venv/.installed
  log "importing the tiny model into a temporary BentoML home"
  "$PYTHON" scripts/import_model.py --tiny >"$WORK/import.log" 2>&1 ||
    { cat "$WORK/import.log" >&2; fail "model import"; }
  local context="$WORK/context"
  mkdir -p "$context/wheels"
  cp service.py README.md requirements.txt "$context/"
  tar --exclude=__pycache__ -cf - clip_runner | tar -xf - -C "$context"
  local wheel="${TORCH_WHEEL:-$(ls -1 /opt/wheels/torch-*+cpu*.whl 2>/dev/null | sort -V | tail -1)}"
  [[ "$wheel" != pypi ]] || wheel=""
  "$PYTHON" - "$context" "$BASE_IMAGE" "$wheel" <<'EOF'
import re, shutil, sys
from pathlib import Path
import yaml
context, base_image, wheel = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
config = yaml.safe_load(Path("bentofile.yaml").read_text())
config["name"] = "clip-bentoml-test"
config["docker"]["base_image"] = base_image
if wheel:  # the CPU build instead of PyPI's CUDA one; bentos install ./wheels/ lines as files
    shutil.copy2(wheel, context / "wheels")
    config["python"]["wheels"] = [f"./wheels/{Path(wheel).name}"]
    requirements = context / "requirements.txt"
    pinned = re.sub(r"(?m)^torch==.*$", f"./env/python/wheels/{Path(wheel).name}", requirements.read_text())
    # No torchvision then: PyPI's is a CUDA build, which does not load beside the CPU torch.
    requirements.write_text(re.sub(r"(?m)^torchvision==.*\n", "", pinned))
(context / "bentofile.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
EOF
  log "bentoml build (torch wheel: ${wheel:-none, torch from PyPI})"
  local tag
  tag="$(cd "$context" && "$BENTOML" build --output tag . 2>"$WORK/build.log" | tail -1)" ||
    { cat "$WORK/build.log" >&2; fail "bentoml build"; }
  tag="${tag#__tag__:}"
  BENTO_TAG="$tag"
  log "bentoml containerize $tag -> $IMAGE"
  "$BENTOML" containerize "$tag" --backend docker --opt network=host -t "$IMAGE" \
    >"$WORK/containerize.log" 2>&1 || { tail -40 "$WORK/containerize.log" >&2; fail "containerize"; }
}

write_model_dirs() {  # what SageMaker would extract into /opt/ml/model, three ways
  mkdir -p "$WORK/model-dir/empty" "$WORK/model-dir/not-clip"
  printf 'not a CLIP checkpoint' >"$WORK/model-dir/not-clip/classifier.pkl"
  # A tiny CLIP with other weights than the baked-in one, and its embedding of the checks' text.
  "$PYTHON" - "$WORK/model-dir/clip" >"$WORK/expected-embedding.json" <<'EOF'
import json, sys
import torch
from clip_runner.model.store import build_random_clip
model, processor = build_random_clip(tiny=True, seed=7)
model.save_pretrained(sys.argv[1])
processor.save_pretrained(sys.argv[1])
with torch.inference_mode():
    tokens = processor.tokenizer(["a photo of a cat"], return_tensors="pt")
    features = model.get_text_features(**tokens)
    features = getattr(features, "pooler_output", features)
print(json.dumps((features / features.norm(dim=-1, keepdim=True))[0].tolist()))
EOF
  chmod -R a+rX "$WORK/model-dir"
}

expect_logged() {  # container, text its log must hold, what that line says
  # Not grep -q: it stops reading at the first match, and pipefail then sees docker's SIGPIPE.
  docker logs "$1" 2>&1 | grep "$2" >/dev/null || fail "no log line saying $3"
}

start_container() {  # name, docker run options...
  local name="$1"
  shift
  CONTAINERS+=("$name")
  docker run -d --name "$name" "$@" "$IMAGE" serve >/dev/null
}

check_runner_restarted() {  # container (serving on the host's 8080)
  # BentoML's image sets BENTOML_CONTAINERIZED, under which its supervisor restarts no worker:
  # the service takes it out (service.py), so a runner that died is started again, as a GPU's
  # broken or stalled runner must be (it exits to be restarted).
  local name="$1" started=$SECONDS
  docker exec -i "$name" python - <<'EOF' || fail "no runner process to kill in the container"
import os, signal
from pathlib import Path
def command_line(path):
    try:
        return path.read_bytes()
    except OSError:  # a process that ended meanwhile
        return b""
runners = [int(path.parent.name) for path in Path("/proc").glob("[0-9]*/cmdline")
           if b"--service-name\0clip_runner\0" in command_line(path)]
assert runners, "no runner process"
for pid in runners:
    os.kill(pid, signal.SIGKILL)
print("killed runner", *runners)
EOF
  "$PYTHON" - http://127.0.0.1:8080 <<'EOF' || fail "the killed runner was not started again"
import base64, io, sys, time
import httpx
from PIL import Image
jpeg = io.BytesIO()
Image.new("RGB", (64, 48), (200, 40, 40)).save(jpeg, "JPEG")
image = base64.b64encode(jpeg.getvalue()).decode()
body = {"images": [image], "classes": [["cat", 1], ["dog", 0]]}
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        if httpx.post(f"{sys.argv[1]}/invocations", json=body, timeout=30).status_code == 200:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    time.sleep(1)
sys.exit("no 200 from /invocations within 120 s of killing the runner")
EOF
  log "runner killed: served again $((SECONDS - started)) s later by a fresh one"
}

check_served_on_host_network() {
  local name="clip-ct-host-$RUN_ID"
  if (exec 3<>/dev/tcp/127.0.0.1/8080) 2>/dev/null; then fail "port 8080 is already in use"; fi
  log "docker run --network host $IMAGE serve"
  local started=$SECONDS
  start_container "$name" --network host
  "$PYTHON" scripts/container_checks.py http://127.0.0.1:8080 --expect-model clip: ||
    { docker logs "$name" 2>&1 | tail -40 >&2; fail "checks against the container"; }
  log "ready and checked $((SECONDS - started)) s after docker run"
  # numba compiled (and cached) the API workers' resize inside the image; else Pillow resizes.
  expect_logged "$name" "images resized on the CPU by numba's compiled loops" \
    "that the API workers' resize is compiled"
  # simplejpeg is in the image and gives Pillow's pixels there; else Pillow decodes (slower).
  expect_logged "$name" "JPEGs decoded in the API workers by simplejpeg" \
    "that simplejpeg decodes the API workers' JPEGs"
  [[ "$(docker exec "$name" id -u)" != "0" ]] || fail "the server runs as root"
  log "runs as $(docker exec "$name" id -un) (uid $(docker exec "$name" id -u))"
  docker exec "$name" sh -c 'ls $BENTO_PATH/models/clip/*/model.safetensors' >/dev/null ||
    fail "the model is not inside the image"
  check_runner_restarted "$name"
  log "SIGTERM"
  local stop_started=$SECONDS
  docker kill --signal TERM "$name" >/dev/null
  timeout 30 docker wait "$name" >"$WORK/exit_code" || fail "still running 30 s after SIGTERM"
  log "stopped $((SECONDS - stop_started)) s after SIGTERM, exit code $(cat "$WORK/exit_code")"
  [[ "$(cat "$WORK/exit_code")" == "0" ]] || fail "exit code $(cat "$WORK/exit_code") after SIGTERM"
}

check_served_without_network() {
  local name="clip-ct-nonet-$RUN_ID"
  log "docker run --network none --cpus 1, empty /opt/ml/model mount, $IMAGE serve" \
    "(checked from inside)"
  # A CPU quota of one core (the container still sees every core): one pass of one torch thread.
  start_container "$name" --network none --cpus 1 -v "$WORK/model-dir/empty:/opt/ml/model:ro"
  [[ "$(docker exec "$name" python -c 'import socket; print(len(socket.if_nameindex()))')" == 1 ]] ||
    fail "the container has a network interface besides loopback"
  docker exec -i "$name" python - http://127.0.0.1:8080 --expect-model clip: \
    <scripts/container_checks.py ||
    { docker logs "$name" 2>&1 | tail -40 >&2; fail "checks without network"; }
  expect_logged "$name" "/opt/ml/model is empty: serving the baked-in model" \
    "the empty /opt/ml/model keeps the baked-in model"
  expect_logged "$name" "up to 1 pass(es) at once of 1 thread(s)" \
    "that the runner keeps to the CPU quota of one core"
  log "empty /opt/ml/model: the baked-in model served, its runner within the one-core quota"
  docker rm -f "$name" >/dev/null
}

check_model_dir_checkpoint() {
  local name="clip-ct-modeldir-$RUN_ID"
  log "docker run -v CHECKPOINT:/opt/ml/model $IMAGE serve (a model from ModelDataUrl)"
  # No network (checked from inside, like the run above): the host's 8080 may be someone else's.
  start_container "$name" --network none -v "$WORK/model-dir/clip:/opt/ml/model:ro"
  docker exec -i "$name" python - http://127.0.0.1:8080 --expect-model model-dir:/opt/ml/model \
    --expect-embedding "$(cat "$WORK/expected-embedding.json")" <scripts/container_checks.py ||
    { docker logs "$name" 2>&1 | tail -40 >&2; fail "checks with a checkpoint in /opt/ml/model"; }
  expect_logged "$name" "serving the CLIP checkpoint in /opt/ml/model" \
    "the /opt/ml/model checkpoint is served"
  log "/opt/ml/model checkpoint served (its embedding matches transformers on the host)"
  docker rm -f "$name" >/dev/null
}

check_model_dir_refused() {
  local name="clip-ct-badmodel-$RUN_ID"
  log "docker run -v NOT-A-CHECKPOINT:/opt/ml/model $IMAGE serve (must not start)"
  start_container "$name" --network none -v "$WORK/model-dir/not-clip:/opt/ml/model:ro"
  timeout 120 docker wait "$name" >"$WORK/bad_exit_code" || fail "still running 120 s later"
  [[ "$(cat "$WORK/bad_exit_code")" != "0" ]] || fail "exit code 0 with no checkpoint"
  docker logs "$name" 2>&1 | grep "holds no CLIP checkpoint" >"$WORK/refusal" ||
    { docker logs "$name" 2>&1 | tail -20 >&2; fail "no clear message for a bad /opt/ml/model"; }
  log "refused, exit code $(cat "$WORK/bad_exit_code"): $(tail -1 "$WORK/refusal" | cut -c1-300)"
}

check_bentoctl_build() {
  if [[ ! -x "$BENTOCTL" ]]; then log "bentoctl build skipped: no $BENTOCTL (make bentoctl)"; return; fi
  local home="$WORK/bentoctl" config="$WORK/deployment_config.yaml" built="clip-sagemaker-$BENTO_TAG"
  BENTOCTL_HOME="$home" COLUMNS=200 "$BENTOCTL" operator install bentoctl/sagemaker-operator \
    >"$WORK/bentoctl.log" 2>&1 || { cat "$WORK/bentoctl.log" >&2; fail "bentoctl operator install"; }
  sed 's/^name: clip$/name: clip-bentoctl-test/' deployment_config.yaml >"$config"
  log "bentoctl build -b $BENTO_TAG --dry-run: stops before the ECR repository and push, which" \
    "need AWS (unreachable here)"
  # bentoctl exits 0 on its own errors: its output says whether the image was built.
  BENTOCTL_HOME="$home" COLUMNS=200 "$BENTOCTL" build -b "$BENTO_TAG" -f "$config" --dry-run \
    >>"$WORK/bentoctl.log" 2>&1 || true
  grep -q "Created docker image: $built" "$WORK/bentoctl.log" ||
    { tail -30 "$WORK/bentoctl.log" >&2; fail "bentoctl build"; }
  grep -E "build context:|buildx is not installed" "$WORK/bentoctl.log" | while read -r line; do
    log "bentoctl: $line"
  done
  local ours theirs
  ours="$(docker image inspect "$built" --format '{{.Id}}')"
  theirs="$(docker image inspect "$IMAGE" --format '{{.Id}}')"
  if [[ "$ours" != "$theirs" ]]; then
    docker history --no-trunc --format '{{.ID}} {{.CreatedBy}}' "$built" | cut -c1-200 >&2
    docker history --no-trunc --format '{{.ID}} {{.CreatedBy}}' "$IMAGE" | cut -c1-200 >&2
    fail "bentoctl's image $built ($ours) is not bentoml containerize's $IMAGE ($theirs)"
  fi
  log "bentoctl build: $built is the image bentoml containerize built (${ours:7:12})"
}

check_torch_in_image() {
  # The bento's own requirements say whether the image must carry torchvision (nvJPEG on a GPU).
  local requirements wants_torchvision=0
  requirements="$BENTOML_HOME/bentos/${BENTO_TAG%%:*}/${BENTO_TAG#*:}/env/python/requirements.txt"
  [[ -f "$requirements" ]] || fail "no $requirements"
  if grep '^torchvision' "$requirements" >/dev/null; then wants_torchvision=1; fi
  docker run --rm -i --network none --entrypoint python "$IMAGE" - "$wants_torchvision" \
    >"$WORK/torch-check" 2>&1 <<'EOF' || { cat "$WORK/torch-check" >&2; fail "torch in the image"; }
import io, sys
import torch
from PIL import Image
buffer = io.BytesIO()
Image.new("RGB", (40, 30), (200, 30, 90)).save(buffer, "JPEG")
found = f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})"
if sys.argv[1] == "1":
    import torchvision
    from torchvision.io import decode_jpeg
    pixels = decode_jpeg(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8))
    assert tuple(pixels.shape) == (3, 30, 40), pixels.shape
    found += f", torchvision {torchvision.__version__} decodes a JPEG"
from transformers import CLIPModel, CLIPProcessor  # they import torchvision where it is installed
print(found + ", transformers loads CLIP")
EOF
  grep '^torch ' "$WORK/torch-check" >/dev/null || { cat "$WORK/torch-check" >&2; fail "torch check"; }
  log "in the image: $(grep '^torch ' "$WORK/torch-check")"
}

ensure_docker
ensure_base_image
build_image
log "image $IMAGE: $(docker image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.2f GB", $1/1e9}')"
check_torch_in_image

write_model_dirs
check_bentoctl_build
check_served_on_host_network
check_served_without_network
check_model_dir_checkpoint
check_model_dir_refused

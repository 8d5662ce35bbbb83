#!/usr/bin/env bash
# Wheels for a lent GPU machine that has PyTorch but not this project's other dependencies and
# cannot download: run here, then carry `.whl` with the device tool (gpu_bench.sh installs it).
#   bash scripts/gpu_wheels.sh            # -> .whl/ (git-ignored through .git/info/exclude)
# Everything in requirements.txt except torch and torchvision (the GPU image brings its CUDA
# builds) and numba, plus py-spy, for CPython 3.12 on manylinux x86-64; packages that image
# already has are dropped to stay small.
case "${1:-}" in -h | --help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
# Not numba either: its LLVM alone is 60 MB. The H200's image had its own (0.68.0; gpu.txt says
# whether the resize compiled); without one the API workers resize with Pillow (the same pixels,
# slower), which would tilt the CLIP_DECODE=api ablation against the API path.
grep -v -E '^(torch|numba|#)' requirements.txt | grep . > .whl/requirements.txt
# And py-spy (3 MB), for the bench's GIL profiles (scripts/gil_profile.py).
grep '^py-spy==' requirements-dev.txt >> .whl/requirements.txt
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
python3 -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl -r .whl/requirements.txt
# Already in the GPU image, where any recent version does (and some large): keep its own builds,
# so the wheels and the working tree stay inside the device tool's 64 MiB. Not Pillow: the
# resizes reproduce the pinned Pillow's pass order (resample.py), which older releases lack.
rm -f .whl/{torch,triton,numpy,nvidia_*,sympy,networkx,setuptools,hf_xet,pygments,pyyaml,regex}-*.whl
# Nor boto3 and botocore (17 MB, the largest): only s3:// image URLs need them, imported on first
# use (images/s3_images.py), and the bench sends none.
rm -f .whl/{boto3,botocore,s3transfer,jmespath}-*.whl
du -sh .whl

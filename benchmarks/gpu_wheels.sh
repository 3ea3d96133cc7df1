#!/usr/bin/env bash
# Run HERE (a machine with pip access), before the GPU machine's one command (benchmarks/gpu_check.sh):
# downloads into .whl/ the Python packages parts needs that the GPU image lacks (it has torch, numpy, pandas,
# scipy, einops, jaxtyping, safetensors, tokenizers, pyarrow, pytest..., and transformers 5.17: parts is
# tested with 5.24). .whl/ is git-ignored (.git/info/exclude); name it in the device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-common-dir)/info/exclude"
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    transformer-lens==4.3.0 transformers==5.24.0 huggingface_hub==2.4.0 datasets==5.2.0 dill==0.4.1 \
    multiprocess==0.70.19 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 googleapis-common-protos==1.76.0 \
    fancy-einsum typeguard beartype better-abc
du -sh .whl && ls .whl

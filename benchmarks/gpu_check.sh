#!/usr/bin/env bash
# The one command for a GPU machine (an H200 lease of a few minutes): the CUDA exactness and synchronisation
# tests, then the protocol benchmark on a random Llama-2-7B-shaped model in bfloat16. From the repository root:
#
#   here, once:         bash benchmarks/gpu_wheels.sh            (packages the GPU image lacks -> .whl/, 19 MB)
#   on the GPU machine: bash benchmarks/gpu_check.sh "$OUT"       (device tool: carry [".whl"], timeout_s 540)
#
# Writes env.txt, tests.txt, protocol.txt, protocol.json and results.md (with the new rows appended) to the
# folder given (default /tmp/parts-gpu). Each step has its own time limit so one stuck step cannot eat the lease.
set -uo pipefail
out=${1:-/tmp/parts-gpu}
mkdir -p "$out"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, transformer_lens; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'gpu', torch.cuda.get_device_name())"; } 2>&1 | tee "$out/env.txt"
# 1. Correctness on CUDA: exactness (float32 1e-4; bf16 / fp16 within the dtype's tolerance), engines agree,
#    no synchronising host copy per batch. ~1 minute.
timeout 200 python3 -m pytest tests/test_devices.py -q -rs -p no:cacheprovider -k cuda 2>&1 | tee "$out/tests.txt"
# 2. The protocol: bench_decompose-style rows (plain / decomposition / prefix reuse at 4 and 24 shots) and every
#    method on one setting per task at 256 test examples, projected to 8 tasks x 3 templates x 5 seeds x 2,000.
timeout 330 python3 benchmarks/bench_protocol.py --model llama-2-7b-shape --device cuda --dtype bfloat16 \
    --json "$out/protocol.json" --note "Run by benchmarks/gpu_check.sh." 2>&1 | tee "$out/protocol.txt"
cp benchmarks/results.md "$out/results.md"

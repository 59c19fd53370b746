#!/usr/bin/env bash
# One call on a lent GPU machine (the device tool runs it in a copy of this repository):
# the cuDNN parity tests, then the MFU matrix of benchmarks/mfu.py: under the device
# tool's 600 s per command even at its worst (90 s tests, no configuration started after
# 300 s, 150 s each).
# Results go under $OUT (the device tool's folder that comes back), else ./gpu_results.
#
# The device image has Python 3.12 with jax 0.11.2 (CUDA 13), flax, optax, orbax and
# einops, but no ml_collections or tensorboardX (the training loop's logs) and no package
# registry: fetch their wheels here first and carry them with the call:
#     pip download --no-deps ml_collections tensorboardX -d .wheels
#     run(command="bash benchmarks/gpu_run.sh", carry=[".wheels"], timeout_s=600)
# Extra arguments go to benchmarks/mfu.py (e.g. --deadline=300, --matrix=smoke).
set -u
OUT=${OUT:-gpu_results}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # jaxlm from this copy, not installed
mkdir -p "$OUT"
if ! python3 -c "import ml_collections, tensorboardX" 2>/dev/null; then
    python3 -m pip install --no-deps --no-index -q .wheels/*.whl || exit 2
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"; } | tee "$OUT/device.txt"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py -k cudnn 2>&1 \
    | tail -15 | tee "$OUT/cudnn_tests.txt"
python3 benchmarks/mfu.py --out="$OUT/mfu" --deadline=300 --timeout=150 "$@"

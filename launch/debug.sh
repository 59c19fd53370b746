#!/usr/bin/env bash
# Single-host debug run (CPU or one GPU): the main job on the tiny debug config.
#   launch/debug.sh [WORKDIR] [--config.field=value ...]
# PYTHON picks the interpreter (default: python). On a GPU host install the CUDA build of the same JAX version first, e.g.
#   pip install "jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')"
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR=${1:-runs/debug}
shift || true
exec "${PYTHON:-python}" -m jaxlm.main --config=configs/gpt/debug.py --workdir="$WORKDIR" "$@"

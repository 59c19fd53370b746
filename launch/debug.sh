#!/usr/bin/env bash
# Single-host debug run (CPU or one GPU): the main job on the tiny debug config.
#   launch/debug.sh [WORKDIR] [--config.FIELD=VALUE ...] [--dry-run]
# WORKDIR defaults to runs/debug. --dry-run (anywhere) prints the command and runs nothing.
# PYTHON picks the interpreter (default: python). On a GPU host install the CUDA build of
# the same JAX version first, e.g.
#   pip install "jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')"
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_quote.sh
usage_and_exit_if_help "$@"

WORKDIR= DRY=0 OVERRIDES=()
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    --config.*) OVERRIDES+=("$arg") ;;
    -*) echo "debug.sh: unknown flag $arg; expected [WORKDIR] [--config.FIELD=VALUE ...] [--dry-run]" >&2; exit 2 ;;
    *) [[ -z $WORKDIR ]] || { echo "debug.sh: two workdirs given ($WORKDIR, $arg)" >&2; exit 2; }
       WORKDIR=$arg ;;
  esac
done
CMD=("${PYTHON:-python}" -m jaxlm.main --config=configs/gpt/debug.py "--workdir=${WORKDIR:-runs/debug}"
     ${OVERRIDES[@]+"${OVERRIDES[@]}"})
if [[ $DRY == 1 ]]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
exec "${CMD[@]}"

#!/usr/bin/env bash
# Runs a jaxlm command on every worker of a Cloud TPU VM slice (v4, v5e, v5p, v6e, ...).
#
#   launch/tpu_pod.sh --name=my-tpu --zone=us-central2-b --accelerator=v4-32 \
#       --config=configs/gpt/gpt2_small.py --workdir=gs://my-bucket/runs/small [--create] \
#       [--project=P] [--version=tpu-ubuntu2204-base] [--dry-run] [-- --config.train.steps=100]
#
# Steps: (1) create the TPU VM if --create and it does not exist, (2) copy this checkout to
# every worker, (3) pip install it with jax[tpu] of the pinned JAX version on every worker,
# (4) run `python -m jaxlm.main` on all workers at once (jax.distributed finds the other
# workers by itself: --config.distributed.auto_detect=true), (5) copy each worker's log
# back into logs/<name>/. --dry-run prints exactly these commands and runs none.
set -euo pipefail

NAME= ZONE= ACCEL= CONFIG= WORKDIR= PROJECT= VERSION=tpu-ubuntu2204-base
CREATE=0 DRY=0 WORKERS= EXTRA=()
for arg in "$@"; do
  # --dry-run counts wherever it stands, even after "--": a misplaced one must not launch.
  if [[ $arg == --dry-run ]]; then DRY=1; continue; fi
  if [[ ${#EXTRA[@]} -gt 0 || $arg == "--" ]]; then EXTRA+=("$arg"); continue; fi
  case $arg in
    --name=*) NAME=${arg#*=} ;;
    --zone=*) ZONE=${arg#*=} ;;
    --accelerator=*) ACCEL=${arg#*=} ;;
    --config=*) CONFIG=${arg#*=} ;;
    --workdir=*) WORKDIR=${arg#*=} ;;
    --project=*) PROJECT=${arg#*=} ;;
    --version=*) VERSION=${arg#*=} ;;
    --workers=*) WORKERS=${arg#*=} ;;
    --create) CREATE=1 ;;
    *) echo "tpu_pod.sh: unknown argument $arg (see the header of $0)" >&2; exit 2 ;;
  esac
done
EXTRA=("${EXTRA[@]:1}")  # drop the "--"
for v in NAME ZONE CONFIG WORKDIR; do
  [[ -n ${!v} ]] || { echo "tpu_pod.sh: --${v,,}=... is required" >&2; exit 2; }
done
[[ $CREATE == 0 || -n $ACCEL ]] || { echo "tpu_pod.sh: --create needs --accelerator=..." >&2; exit 2; }

cd "$(dirname "$0")/.."
JAX_VERSION=$(python3 -c 'import jax; print(jax.__version__)' 2>/dev/null || echo "")
JAX_PIN=${JAX_VERSION:+==$JAX_VERSION}
G=(gcloud compute tpus tpu-vm)
LOC=(--zone="$ZONE" ${PROJECT:+--project="$PROJECT"})

run() {  # prints the command; runs it unless --dry-run
  printf '%q ' "$@"; echo
  [[ $DRY == 1 ]] || "$@"
}

if [[ $CREATE == 1 ]]; then
  if [[ $DRY == 1 ]] || ! "${G[@]}" describe "$NAME" "${LOC[@]}" >/dev/null 2>&1; then
    run "${G[@]}" create "$NAME" "${LOC[@]}" --accelerator-type="$ACCEL" --version="$VERSION"
  fi
fi
if [[ -z $WORKERS && $DRY == 0 ]]; then
  WORKERS=$("${G[@]}" describe "$NAME" "${LOC[@]}" --format=json \
            | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["networkEndpoints"]))')
fi
WORKERS=${WORKERS:-1}

run tar czf /tmp/jaxlm-src.tgz --exclude=.git --exclude=.venv --exclude=runs .
run "${G[@]}" scp /tmp/jaxlm-src.tgz "$NAME":/tmp/jaxlm-src.tgz --worker=all "${LOC[@]}"
run "${G[@]}" ssh "$NAME" --worker=all "${LOC[@]}" --command \
  "mkdir -p ~/jaxlm && tar xzf /tmp/jaxlm-src.tgz -C ~/jaxlm && cd ~/jaxlm && pip install -q -e . 'jax[tpu]$JAX_PIN'"
MAIN="cd ~/jaxlm && python3 -m jaxlm.main --config=$CONFIG --workdir=$WORKDIR --config.distributed.auto_detect=true"
for e in "${EXTRA[@]}"; do MAIN+=" $(printf '%q' "$e")"; done
run "${G[@]}" ssh "$NAME" --worker=all "${LOC[@]}" --command "$MAIN > ~/jaxlm_run.log 2>&1; echo exit \$?"
[[ $DRY == 1 ]] || mkdir -p "logs/$NAME"
for ((w = 0; w < WORKERS; w++)); do
  run "${G[@]}" scp "$NAME":~/jaxlm_run.log "logs/$NAME/worker-$w.log" --worker="$w" "${LOC[@]}"
done

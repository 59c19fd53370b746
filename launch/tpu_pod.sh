#!/usr/bin/env bash
# Runs a jaxlm command on every worker of a Cloud TPU VM slice (v4, v5e, v5p, v6e, ...).
#
#   launch/tpu_pod.sh --name=my-tpu --zone=us-central2-b --accelerator=v4-32 \
#       --config=configs/gpt/gpt2_small.py --workdir=/mnt/shared/runs/small [--create] \
#       [--project=P] [--version=tpu-ubuntu2204-base] [--dry-run] [-- --config.train.steps=100]
#
# Steps: (1) create the TPU VM if --create and it does not exist, (2) copy this checkout to
# every worker, (3) pip install it with jax[tpu] of the same JAX version as here (or
# $JAX_VERSION) on every worker, (4) run `python -m jaxlm.main` on all workers at once
# (jax.distributed finds the other workers by itself: --config.distributed.auto_detect=true),
# (5) copy each worker's log back into logs/<name>/. --dry-run prints exactly these
# commands and runs none.
#
# The workdir must be a folder every worker sees (a shared filesystem, or a bucket mounted
# with gcsfuse): a gs:// URL is not a workdir. Every value that goes into the command the
# workers' shell runs is quoted for it, whatever characters it holds.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_quote.sh
usage_and_exit_if_help "$@"

NAME= ZONE= ACCEL= CONFIG= WORKDIR= PROJECT= VERSION=tpu-ubuntu2204-base
CREATE=0 DRY=0 WORKERS= EXTRA=() SEEN_DASHES=0
for arg in "$@"; do
  # --dry-run counts wherever it stands, even after "--": a misplaced one must not launch.
  if [[ $arg == --dry-run ]]; then DRY=1; continue; fi
  if [[ $SEEN_DASHES == 1 ]]; then EXTRA+=("$arg"); continue; fi
  case $arg in
    --) SEEN_DASHES=1 ;;
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
for v in NAME ZONE CONFIG WORKDIR; do
  [[ -n ${!v} ]] || { echo "tpu_pod.sh: --${v,,}=... is required" >&2; exit 2; }
done
[[ $CREATE == 0 || -n $ACCEL ]] || { echo "tpu_pod.sh: --create needs --accelerator=..." >&2; exit 2; }
need_match name "$NAME" '^[a-z]([-a-z0-9]*[a-z0-9])?$' "a TPU name (lowercase letters, digits, -)"
[[ -z $WORKERS ]] || need_match workers "$WORKERS" '^[1-9][0-9]*$' "a number of workers"
[[ $WORKDIR != *://* ]] || { echo "tpu_pod.sh: --workdir=$WORKDIR: a URL is not a workdir; mount the bucket on every worker (gcsfuse) and pass its path" >&2; exit 2; }
for e in ${EXTRA[@]+"${EXTRA[@]}"}; do
  [[ $e == --config.* ]] || { echo "tpu_pod.sh: after --, only --config.FIELD=VALUE overrides are passed on, not $e" >&2; exit 2; }
done

PIN=$(jax_pin)
G=(gcloud compute tpus tpu-vm)
LOC=(--zone="$ZONE" ${PROJECT:+--project="$PROJECT"})

run() {  # prints the command (each argument quoted for bash); runs it unless --dry-run
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

# The commands below run in each worker's shell: every user value goes in through shq.
INSTALL="mkdir -p ~/jaxlm && tar xzf /tmp/jaxlm-src.tgz -C ~/jaxlm && cd ~/jaxlm && pip install -q -e . $(shq "jax[tpu]$PIN")"
MAIN="cd ~/jaxlm && python3 -m jaxlm.main $(shq "--config=$CONFIG") $(shq "--workdir=$WORKDIR") --config.distributed.auto_detect=true"
for e in ${EXTRA[@]+"${EXTRA[@]}"}; do MAIN+=" $(shq "$e")"; done

run tar czf /tmp/jaxlm-src.tgz --exclude=.git --exclude=.venv --exclude=runs --exclude=logs .
run "${G[@]}" scp /tmp/jaxlm-src.tgz "$NAME":/tmp/jaxlm-src.tgz --worker=all "${LOC[@]}"
run "${G[@]}" ssh "$NAME" --worker=all "${LOC[@]}" --command "$INSTALL"
run "${G[@]}" ssh "$NAME" --worker=all "${LOC[@]}" --command "$MAIN > ~/jaxlm_run.log 2>&1; echo exit \$?"
[[ $DRY == 1 ]] || mkdir -p "logs/$NAME"
for ((w = 0; w < WORKERS; w++)); do
  run "${G[@]}" scp "$NAME":~/jaxlm_run.log "logs/$NAME/worker-$w.log" --worker="$w" "${LOC[@]}"
done

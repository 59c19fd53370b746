#!/usr/bin/env bash
# Submits a multi-node GPU run to SLURM: one jaxlm process per node, all GPUs of the node
# each, joined by jax.distributed (JAX reads the SLURM environment: auto_detect=true).
#
#   launch/slurm.sh --nodes=4 --gpus-per-node=8 --config=configs/gpt/gpt2_xl.py \
#       --workdir=/shared/runs/xl [--partition=P] [--time=24:00:00] [--venv=.venv] \
#       [--dry-run] [-- --config.train.steps=1000]
#
# Writes the batch script to logs/slurm/<job>.sbatch and submits it with sbatch; --dry-run
# prints the script and the sbatch command instead. Logs: logs/slurm/<job>-%j.out.
# SLURM sends SIGTERM 5 minutes before the time limit (--signal): jaxlm then saves and
# exits 0, and submitting the same script again resumes the run. Paths and overrides are
# quoted in the script, whatever characters they hold.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_quote.sh
usage_and_exit_if_help "$@"

NODES=1 GPUS=8 CONFIG= WORKDIR= PARTITION= TIME=24:00:00 VENV=.venv DRY=0 EXTRA=() SEEN_DASHES=0
for arg in "$@"; do
  # --dry-run counts wherever it stands, even after "--": a misplaced one must not launch.
  if [[ $arg == --dry-run ]]; then DRY=1; continue; fi
  if [[ $SEEN_DASHES == 1 ]]; then EXTRA+=("$arg"); continue; fi
  case $arg in
    --) SEEN_DASHES=1 ;;
    --nodes=*) NODES=${arg#*=} ;;
    --gpus-per-node=*) GPUS=${arg#*=} ;;
    --config=*) CONFIG=${arg#*=} ;;
    --workdir=*) WORKDIR=${arg#*=} ;;
    --partition=*) PARTITION=${arg#*=} ;;
    --time=*) TIME=${arg#*=} ;;
    --venv=*) VENV=${arg#*=} ;;
    *) echo "slurm.sh: unknown argument $arg (see the header of $0)" >&2; exit 2 ;;
  esac
done
[[ -n $CONFIG && -n $WORKDIR ]] || { echo "slurm.sh: --config=... and --workdir=... are required" >&2; exit 2; }
need_match nodes "$NODES" '^[1-9][0-9]*$' "a number of nodes"
need_match gpus-per-node "$GPUS" '^[1-9][0-9]*$' "a number of GPUs"
need_match time "$TIME" '^[0-9:-]+$' "a SLURM time limit such as 24:00:00 or 1-12:00:00"
[[ -z $PARTITION ]] || need_match partition "$PARTITION" '^[A-Za-z0-9_.,-]+$' "partition name(s)"
for e in ${EXTRA[@]+"${EXTRA[@]}"}; do
  [[ $e == --config.* ]] || { echo "slurm.sh: after --, only --config.FIELD=VALUE overrides are passed on, not $e" >&2; exit 2; }
done

BASE=$(basename "$CONFIG" .py)
JOB="jaxlm-${BASE//[^A-Za-z0-9_.-]/_}"  # names a file and an #SBATCH line: no odd characters
SCRIPT="logs/slurm/$JOB.sbatch"
ARGS="$(shq "--config=$CONFIG") $(shq "--workdir=$WORKDIR") --config.distributed.auto_detect=true"
for e in ${EXTRA[@]+"${EXTRA[@]}"}; do ARGS+=" $(shq "$e")"; done

BODY="#!/usr/bin/env bash
#SBATCH --job-name=$JOB
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$GPUS
#SBATCH --time=$TIME
#SBATCH --signal=TERM@300
#SBATCH --output=logs/slurm/$JOB-%j.out
${PARTITION:+#SBATCH --partition=$PARTITION}
set -euo pipefail
cd $(shq "$(pwd)")
source $(shq "$VENV/bin/activate")
srun python -m jaxlm.main $ARGS"

if [[ $DRY == 1 ]]; then
  echo "# $SCRIPT"
  echo "$BODY"
  echo "sbatch $SCRIPT"
else
  mkdir -p logs/slurm
  echo "$BODY" > "$SCRIPT"
  sbatch "$SCRIPT"
fi

#!/bin/bash
# FreeLM training under SLURM.
#
#   sbatch slurm/train.sh                                        # the recipe below, on the resources below
#   sbatch --nodes=4 slurm/train.sh recipes/1.3b.yaml train.steps=20000    # recipe and overrides as arguments
#   sbatch slurm/train.sh train.steps=20000                      # overrides only: the default recipe
#
# Layout: one task per GPU, started by srun; each task reads its rank from SLURM (SLURM_PROCID, SLURM_NTASKS,
# SLURM_LOCALID), rank 0's node is the rendezvous.
# Failures: if the training step fails (a rank crashed or was killed, a node was lost), the script relaunches
# it from the latest complete checkpoint, up to FREELM_MAX_RESTARTS times (default 3) after
# FREELM_RESTART_DELAY seconds (default 10). A config or data error (exit 2) or a checkpoint that cannot be
# written (exit 3) is not retried.
# Time limit: --signal=B:USR1@SECONDS has SLURM signal this script that long before the limit; it asks the
# trainer to checkpoint, waits for it (never past the limit less FREELM_REQUEUE_SLACK seconds, default 30),
# and requeues the job, which resumes from the newest complete checkpoint. Give SECONDS enough for one step
# plus one save (`freelm plan` prints the checkpoint size; the log prints each save's GB/s).
# Logs: <job name>-<job id>.log in the submission directory (appended across requeues); checkpoints,
# metrics.jsonl and the MLflow store: the recipe's train.run_dir.
#
# ---- edit here (or pass the same options to sbatch) ---------------------------------------------------------
#SBATCH --job-name=freelm
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --partition=gpu
##SBATCH --account=my-account
#SBATCH --output=%x-%j.log
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
RECIPE_DEFAULT=${FREELM_RECIPE:-recipes/0.3b.yaml}
# -------------------------------------------------------------------------------------------------------------
set -uo pipefail

FREELM=${FREELM:-.venv/bin/freelm}
MAX_RESTARTS=${FREELM_MAX_RESTARTS:-3}
RESTART_DELAY=${FREELM_RESTART_DELAY:-10}
REQUEUE_SLACK=${FREELM_REQUEUE_SLACK:-30}
NOT_RETRIED="2 3"  # pipeline/errors.py: a config or data error, a checkpoint that cannot be written
SRUN_PID=

if [ $# -gt 0 ] && [[ $1 != *=* || -f $1 ]]; then  # the first argument is the recipe, unless it is an override
  RECIPE=$1
  shift
else
  RECIPE=$RECIPE_DEFAULT
fi
if [ ! -f "$RECIPE" ]; then
  echo "freelm: no recipe file '$RECIPE' (in $(pwd)); usage: sbatch slurm/train.sh [RECIPE.yaml] [key=value ...]" >&2
  exit 2
fi
# shellcheck source=slurm/env.sh
source slurm/env.sh
# Slurm >= 22.05 no longer hands sbatch's --cpus-per-task down to srun: pass it on explicitly.
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
BASE_PORT=${FREELM_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}  # not $MASTER_PORT: sbatch exports the caller's environment
export MASTER_ADDR
unset RANK WORLD_SIZE LOCAL_RANK  # each task takes its rank from SLURM (stale values could leak in via sbatch)
echo "freelm: job $SLURM_JOB_ID (requeue ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NUM_NODES node(s), $SLURM_NTASKS tasks," \
     "rendezvous $MASTER_ADDR, recipe $RECIPE $*"

seconds_left() {  # of the job's time limit, from squeue's [days-]hours:minutes:seconds; empty if unlimited
  local left
  left=$(squeue -h -j "$SLURM_JOB_ID" -o %L 2>/dev/null) || return 0
  [[ $left =~ ^(([0-9]+)-)?(([0-9]+):)?([0-9]+):([0-9]+)$ ]] || return 0
  echo $(( ${BASH_REMATCH[2]:-0} * 86400 + 10#${BASH_REMATCH[4]:-0} * 3600 + 10#${BASH_REMATCH[5]} * 60 + 10#${BASH_REMATCH[6]} ))
}

requeue() {
  echo "freelm: time limit near: asking the trainer to checkpoint, then requeueing job $SLURM_JOB_ID"
  if [ -n "$SRUN_PID" ]; then
    kill -USR1 "$SRUN_PID" 2>/dev/null
    local budget waited=0
    budget=$(seconds_left)
    budget=$(( ${budget:-86400} - REQUEUE_SLACK ))
    while kill -0 "$SRUN_PID" 2>/dev/null && [ "$waited" -lt "$budget" ]; do sleep 1; waited=$((waited + 1)); done
    if kill -0 "$SRUN_PID" 2>/dev/null; then
      echo "freelm: the checkpoint did not finish ${REQUEUE_SLACK} s before the limit; requeueing anyway (the job" \
           "resumes from the previous checkpoint; give --signal=B:USR1@SECONDS more time)"
    fi
  fi
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}
trap requeue USR1

attempt=0
while true; do
  export MASTER_PORT=$((BASE_PORT + attempt))  # a fresh port: the last attempt's may linger in TIME_WAIT
  srun --kill-on-bad-exit=1 "$FREELM" train --config "$RECIPE" "$@" &
  SRUN_PID=$!
  wait "$SRUN_PID"
  status=$?
  SRUN_PID=
  [ "$status" -eq 0 ] && exit 0
  if [[ " $NOT_RETRIED " == *" $status "* ]]; then
    echo "freelm: training failed with exit code $status (a config, data or checkpoint error): not retried" >&2
    exit "$status"
  fi
  if [ "$attempt" -ge "$MAX_RESTARTS" ]; then
    echo "freelm: training failed with exit code $status after $attempt restart(s) (FREELM_MAX_RESTARTS=$MAX_RESTARTS)" >&2
    exit "$status"
  fi
  attempt=$((attempt + 1))
  echo "freelm: training failed with exit code $status; restart $attempt of $MAX_RESTARTS in $RESTART_DELAY s," \
       "from the latest complete checkpoint" >&2
  sleep "$RESTART_DELAY" &
  wait $!
done

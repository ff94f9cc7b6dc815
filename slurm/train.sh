#!/bin/bash
# FreeLM training under SLURM.
#
#   sbatch slurm/train.sh                                        # the recipe below, on the resources below
#   sbatch --nodes=4 slurm/train.sh recipes/1.3b.yaml train.steps=20000    # recipe and overrides as arguments
#
# Layout: one task per GPU, started by srun; each task reads its rank from SLURM (SLURM_PROCID, SLURM_NTASKS,
# SLURM_LOCALID), rank 0's node is the rendezvous. Five minutes before the time limit SLURM signals this
# script; it asks the trainer to checkpoint, waits for it, and requeues the job, which resumes from that
# checkpoint. Logs: <job name>-<job id>.log in the submission directory (appended across requeues);
# checkpoints, metrics.jsonl and the MLflow store: the recipe's train.run_dir.
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
RECIPE_DEFAULT=recipes/0.3b.yaml
# -------------------------------------------------------------------------------------------------------------
set -euo pipefail

RECIPE=${1:-$RECIPE_DEFAULT}
[ $# -gt 0 ] && shift
FREELM=${FREELM:-.venv/bin/freelm}
# shellcheck source=slurm/env.sh
source slurm/env.sh

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${FREELM_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}  # not $MASTER_PORT: sbatch exports the caller's environment
export MASTER_ADDR MASTER_PORT
unset RANK WORLD_SIZE LOCAL_RANK  # each task takes its rank from SLURM (stale values could leak in via sbatch)
echo "freelm: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NUM_NODES node(s), $SLURM_NTASKS tasks," \
     "rendezvous $MASTER_ADDR:$MASTER_PORT, recipe $RECIPE $*"

requeue() {
  echo "freelm: time limit near: asking the trainer to checkpoint, then requeueing job $SLURM_JOB_ID"
  kill -USR1 "$SRUN_PID" 2>/dev/null || true
  wait "$SRUN_PID" || true
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}
trap requeue USR1

srun --kill-on-bad-exit=1 "$FREELM" train --config "$RECIPE" "$@" &
SRUN_PID=$!
wait "$SRUN_PID"

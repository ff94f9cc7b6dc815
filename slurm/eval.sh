#!/bin/bash
# Zero-shot evaluation of a training run under SLURM (one process: the checkpoint is consolidated whatever
# its TP degree, and scored on one device).
#
#   sbatch slurm/eval.sh runs/freelm-0.3b                       # all tasks with a dev split
#   sbatch slurm/eval.sh runs/freelm-0.3b --only sst2,mrpc --heldout data/heldout.txt
#
# Results: the table in the job log (<job name>-<job id>.log) and RUN_DIR/eval-<job id>.json.
#SBATCH --job-name=freelm-eval
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.log
set -euo pipefail

RUN_DIR=${1:?usage: sbatch slurm/eval.sh RUN_DIR [freelm eval options]}
shift
FREELM=${FREELM:-.venv/bin/freelm}
source slurm/env.sh
unset RANK WORLD_SIZE LOCAL_RANK
export MASTER_ADDR=127.0.0.1 MASTER_PORT=${FREELM_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
"$FREELM" eval --checkpoint "$RUN_DIR" --tasks "${TASKS:-recipes/tasks.yaml}" --split "${SPLIT:-dev}" \
  --json "$RUN_DIR/eval-$SLURM_JOB_ID.json" "$@"

#!/bin/bash
# Zero-shot evaluation of a training run under SLURM: one task per GPU, started by srun, as training.
#
#   sbatch slurm/eval.sh runs/freelm-0.3b                                  # 1 GPU (the resources below)
#   sbatch slurm/eval.sh runs/freelm-0.3b --only sst2,mrpc --heldout data/heldout.txt
#   sbatch --ntasks-per-node=8 --gpus-per-node=8 slurm/eval.sh runs/freelm-13b       # a TP x DP grid
#
# Grid: when the number of tasks is a multiple of the checkpoint's TP degree, the model is built at that
# degree, each task loads only its own TP shard and the remaining factor is data-parallel (the examples are
# dealt over it); otherwise every task loads the whole model (TP=1). Each task runs on the GPU of its local
# rank (NCCL) in the run's training precision, or on the CPU in fp32 where there is none. The numbers equal a
# one-process evaluation's. Results: the table in the job log (<job name>-<job id>.log) and
# RUN_DIR/eval-<job id>.json, from rank 0.
#SBATCH --job-name=freelm-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.log
set -euo pipefail

RUN_DIR=${1:?usage: sbatch slurm/eval.sh RUN_DIR [freelm eval options]}
shift
FREELM=${FREELM:-.venv/bin/freelm}
# shellcheck source=slurm/env.sh
source slurm/env.sh

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${FREELM_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}  # not $MASTER_PORT: sbatch exports the caller's environment
export MASTER_ADDR MASTER_PORT
unset RANK WORLD_SIZE LOCAL_RANK  # each task takes its rank from SLURM
echo "freelm eval: job $SLURM_JOB_ID, $SLURM_NTASKS task(s) on $SLURM_JOB_NUM_NODES node(s), run $RUN_DIR $*"

srun --kill-on-bad-exit=1 "$FREELM" eval --checkpoint "$RUN_DIR" --tasks "${TASKS:-recipes/tasks.yaml}" \
  --split "${SPLIT:-dev}" --json "$RUN_DIR/eval-$SLURM_JOB_ID.json" "$@"

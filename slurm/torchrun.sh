#!/bin/bash
# FreeLM training under SLURM through torchrun: srun starts one torchrun per node, each starts one process per
# GPU, and the torchruns of all nodes meet at a c10d rendezvous on the allocation's first node.
#
#   sbatch slurm/torchrun.sh recipes/1.3b.yaml train.steps=20000
#   NPROC_PER_NODE=4 sbatch --nodes=4 slurm/torchrun.sh recipes/1.3b.yaml   # default: the node's GPUs
#
# slurm/train.sh (one srun task per GPU, no torchrun) is the main path: it also turns SLURM's pre-timeout
# signal into a checkpoint and a requeue. Use this one where torchrun is wanted (its rendezvous, its restarts
# with --max-restarts). A run directory with a checkpoint resumes from it either way.
#
# ---- edit here (or pass the same options to sbatch) ---------------------------------------------------------
#SBATCH --job-name=freelm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --partition=gpu
##SBATCH --account=my-account
#SBATCH --output=%x-%j.log
RECIPE_DEFAULT=recipes/0.3b.yaml
# -------------------------------------------------------------------------------------------------------------
set -euo pipefail

RECIPE=${1:-$RECIPE_DEFAULT}
[ $# -gt 0 ] && shift
TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
# The node's one task holds the CPUs of all its processes: each gets its share (slurm/env.sh keeps this value).
CPUS=${SLURM_CPUS_PER_TASK:-$NPROC_PER_NODE}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CPUS > NPROC_PER_NODE ? CPUS / NPROC_PER_NODE : 1 ))}
# shellcheck source=slurm/env.sh
source slurm/env.sh

RDZV_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
RDZV_PORT=${FREELM_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT  # torchrun sets them for each process it starts
echo "freelm: job $SLURM_JOB_ID on $SLURM_JOB_NUM_NODES node(s) x $NPROC_PER_NODE processes, rendezvous" \
     "$RDZV_HOST:$RDZV_PORT, recipe $RECIPE $*"

srun --kill-on-bad-exit=1 "$TORCHRUN" --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "$NPROC_PER_NODE" \
    --rdzv_backend c10d --rdzv_endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv_id "$SLURM_JOB_ID" \
    -m pipeline.cli train --config "$RECIPE" "$@"

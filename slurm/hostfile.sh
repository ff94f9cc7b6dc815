#!/bin/bash
# Write a DeepSpeed hostfile for the current SLURM allocation: one line per node, `host slots=<GPUs per node>`.
#
#   salloc --nodes=2 --gpus-per-node=8 ...
#   bash slurm/hostfile.sh > hostfile
#   source slurm/env.sh
#   deepspeed --hostfile hostfile --master_addr "$(head -n1 hostfile | cut -d' ' -f1)" \
#       --venv_script "$PWD/slurm/env.sh" --module pipeline.cli train --config recipes/1.3b.yaml
#
# The deepspeed launcher reaches the other nodes over ssh (pdsh when installed): passwordless ssh between
# the allocated nodes is required, which sbatch + srun (slurm/train.sh, slurm/torchrun.sh) does not need.
# --venv_script: each node sources slurm/env.sh before starting its ranks (ssh passes on few variables).
# Slots per node: SLOTS, else the GPUs per node of the allocation, else its tasks per node.
set -euo pipefail
SLOTS=${SLOTS:-${SLURM_GPUS_ON_NODE:-${SLURM_NTASKS_PER_NODE:-8}}}
scontrol show hostnames "${SLURM_JOB_NODELIST:?run inside a SLURM allocation}" | while read -r host; do
  echo "$host slots=$SLOTS"
done

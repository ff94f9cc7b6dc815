# Network and runtime settings for multi-node runs, in one place; sourced by slurm/train.sh (and worth
# sourcing before a `deepspeed --hostfile` launch). Everything is a default: values already set win.

# NCCL: the interface for bootstrap / socket traffic (e.g. the cluster's Ethernet, not docker0 or lo), and
# the InfiniBand HCAs to use; unset lets NCCL pick.
# export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-eth0}
# export NCCL_IB_HCA=${NCCL_IB_HCA:-mlx5}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}                 # INFO prints the topology NCCL found
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a dead rank fails the job, not hangs it
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}          # overlaps TP communication with compute

# Threads per task: the CPUs SLURM gave it.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

# DeepSpeed's JIT-built ops are cached here; share it across jobs to build them once.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-${HOME:-/tmp}/.cache/torch_extensions}

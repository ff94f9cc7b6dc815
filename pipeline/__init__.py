"""FreeLM pretraining pipeline: DeepSpeed ZeRO-3 x megatron-core tensor parallelism."""

import warnings

__version__ = "0.1.0"

# megatron-core announces at import that it falls back to torch kernels when Apex/TransformerEngine are
# absent; the pipeline never uses those paths, so the notice is noise.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
# DeepSpeed 0.19 calls torch.distributed.reduce_scatter_tensor, deprecated in torch 2.13, on every ZeRO step.
warnings.filterwarnings("ignore", message=r"`torch.distributed.reduce_scatter_tensor` is deprecated")

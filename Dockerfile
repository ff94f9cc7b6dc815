# FreeLM pipeline image. Default: GPU, on PyTorch's CUDA image (its torch is kept by scripts/setup.sh; the
# devel variant carries nvcc for DeepSpeed's JIT-built fused ops).
# CPU-only variant:  docker build --build-arg BASE_IMAGE=python:3.11-slim-bookworm -t freelm:cpu .
# (pass --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to take PyTorch's CPU wheel)
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-devel
FROM ${BASE_IMAGE}

# Optional: a CA bundle / local wheel folder for pip behind a proxy; pip reads these variables.
ARG PIP_CERT
ARG PIP_FIND_LINKS
ARG TORCH_INDEX_URL
ENV PYTHONUNBUFFERED=1

# Compilers and headers for DeepSpeed's JIT ops; venv support on Debian-based images.
RUN if command -v apt-get >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends g++ python3-dev python3-venv git \
      && rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /opt/freelm
COPY . .
# The same install path as the README: one script, one way.
RUN VENV=/opt/freelm/.venv bash scripts/setup.sh
ENV PATH=/opt/freelm/.venv/bin:$PATH

CMD ["freelm", "demo"]

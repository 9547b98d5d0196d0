# syntax=docker/dockerfile:1
# Image of a cloud worker group: `estuary worker run`, which launches torchrun itself when
# the config has stages > 1. Build context is the repository root:
#   docker build -f deploy/docker/worker.Dockerfile -t estuary-worker:0.1.0 .
#   docker build -f deploy/docker/worker.Dockerfile --build-arg CUDA=cu126 -t estuary-worker:0.1.0-cu126 .
# CUDA empty (the default): CPU torch, stages over gloo. CUDA=cuXYZ: torch from PyTorch's
# cuXYZ wheel index, which brings its own CUDA libraries; the host needs an NVIDIA driver
# new enough for that CUDA release and the NVIDIA container toolkit.

ARG PYTHON_VERSION=3.12

FROM python:${PYTHON_VERSION}-slim AS build
ARG CUDA=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, from the wheel index of the chosen build: the project's torch>=2.4 is then
# already satisfied and pip keeps this build.
RUN python -m venv /opt/estuary \
 && /opt/estuary/bin/pip install --index-url "https://download.pytorch.org/whl/${CUDA:-cpu}" "torch>=2.4"
# The repository's .dockerignore keeps the context to the package sources.
COPY . /src
RUN /opt/estuary/bin/pip install "/src[worker]"

FROM python:${PYTHON_VERSION}-slim
# A fixed uid/gid (10001), so volume ownership and Kubernetes' runAsUser agree with it.
RUN groupadd --system --gid 10001 estuary \
 && useradd --system --uid 10001 --gid estuary --home-dir /var/lib/estuary --no-create-home \
      --shell /usr/sbin/nologin estuary \
 && install -d -o estuary -g estuary -m 0750 /var/lib/estuary /var/lib/estuary/blobs \
      /var/lib/estuary/base
# Same path as in the build stage, so the venv's scripts keep working.
COPY --from=build /opt/estuary /opt/estuary
# Read by the NVIDIA container runtime; ignored without a GPU.
ENV PATH=/opt/estuary/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /var/lib/estuary
ENTRYPOINT ["estuary"]
CMD ["worker", "run", "--config", "/etc/estuary/worker.toml"]

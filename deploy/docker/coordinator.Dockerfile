# syntax=docker/dockerfile:1
# Image of a coordinator replica: `estuary coordinator serve`. Build context is the
# repository root (compose.yaml builds it so):
#   docker build -f deploy/docker/coordinator.Dockerfile -t estuary-coordinator:0.1.0 .
# CPU torch only: the coordinator adds adapter updates, it never trains or serves a model.

ARG PYTHON_VERSION=3.12

FROM python:${PYTHON_VERSION}-slim AS build
# torch first, from PyTorch's CPU wheel index: the project's torch>=2.4 is then already
# satisfied and pip does not pull the CUDA wheels (several GB) that PyPI's torch depends on.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/estuary \
 && /opt/estuary/bin/pip install --index-url "${TORCH_INDEX_URL}" "torch>=2.4"
# The repository's .dockerignore keeps the context to the package sources.
COPY . /src
RUN /opt/estuary/bin/pip install "/src[coordinator]"

FROM python:${PYTHON_VERSION}-slim
# A fixed uid/gid (10001), so volume ownership and Kubernetes' runAsUser agree with it.
RUN groupadd --system --gid 10001 estuary \
 && useradd --system --uid 10001 --gid estuary --home-dir /var/lib/estuary --no-create-home \
      --shell /usr/sbin/nologin estuary \
 && install -d -o estuary -g estuary -m 0750 /var/lib/estuary /var/lib/estuary/blobs \
      /var/lib/estuary/base
# Same path as in the build stage, so the venv's scripts keep working.
COPY --from=build /opt/estuary /opt/estuary
ENV PATH=/opt/estuary/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /var/lib/estuary
# gRPC (server.listen) and Prometheus /metrics (server.metrics_port).
EXPOSE 50051 9464
ENTRYPOINT ["estuary"]
CMD ["coordinator", "serve", "--config", "/etc/estuary/coordinator.toml"]

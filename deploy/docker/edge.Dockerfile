# syntax=docker/dockerfile:1
# Image of an edge agent: `estuary edge enroll`, then `estuary edge run`. Build context is
# the repository root:
#   docker build -f deploy/docker/edge.Dockerfile -t estuary-edge:0.1.0 .
# CPU torch (devices train on CPU); no Redis or Prometheus client: the edge extra only.

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
RUN /opt/estuary/bin/pip install "/src[edge]"

FROM python:${PYTHON_VERSION}-slim
# A fixed uid/gid (10001), so volume ownership and Kubernetes' runAsUser agree with it.
# /usr/share/estuary/stdlib: this interpreter's standard library, the demo's private data
# (one package per agent, as in `estuary simulate`), at a path that does not name the
# Python version.
RUN groupadd --system --gid 10001 estuary \
 && useradd --system --uid 10001 --gid estuary --home-dir /var/lib/estuary-edge \
      --no-create-home --shell /usr/sbin/nologin estuary \
 && install -d -o estuary -g estuary -m 0700 /var/lib/estuary-edge \
 && install -d /usr/share/estuary \
 && ln -s "$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')" \
      /usr/share/estuary/stdlib
# Same path as in the build stage, so the venv's scripts keep working.
COPY --from=build /opt/estuary /opt/estuary
ENV PATH=/opt/estuary/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /var/lib/estuary-edge
ENTRYPOINT ["estuary"]
CMD ["edge", "run", "--config", "/etc/estuary/edge.toml"]

# syntax=docker/dockerfile:1
# A hospital's site client on an NVIDIA GPU. Needs the NVIDIA driver and the NVIDIA
# Container Toolkit on the host (`docker run --gpus all`, or the GPU reservation in
# deploy/compose/docker-compose.gpu.yaml). site.yaml's `runtime.device: auto` then
# picks cuda; `cuda` makes a missing GPU an error instead of a silent CPU fallback.
#
#   docker build -f deploy/docker/site-cuda.Dockerfile -t medmeta-site-cuda .
#   (from the repository root)
#
# The CUDA wheel of torch brings its own CUDA libraries; the nvidia/cuda base adds
# the settings under which the NVIDIA runtime mounts the host's driver. Choose the
# CUDA version of the wheel (TORCH_INDEX_URL) that the host's driver supports.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# The user the site runs as: the owner of the site's private key on the host.
ARG UID=10001
ARG GID=10001

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    VIRTUAL_ENV=/opt/medmeta/.venv \
    PATH=/opt/medmeta/.venv/bin:$PATH

# Ubuntu 24.04's Python is 3.12 (the project supports 3.11 and 3.12).
# Ubuntu images ship a user with UID 1000 ("ubuntu"): it is removed so that UID can be
# chosen freely. tini is PID 1: it forwards SIGTERM and reaps the ClientApp processes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv tini ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && test "${UID}" != 0 \
    && (userdel --remove ubuntu 2>/dev/null || true) \
    && groupadd --gid "${GID}" medmeta \
    && useradd --uid "${UID}" --gid "${GID}" --create-home --shell /usr/sbin/nologin medmeta

WORKDIR /opt/medmeta
# torch (CUDA build) first; the project's `torch>=2.8` is then met and kept.
RUN python3 -m venv .venv \
    && .venv/bin/pip install --upgrade pip \
    && .venv/bin/pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

COPY pyproject.toml README.md ./
RUN mkdir -p medmeta medmeta_common server client \
    && touch medmeta/__init__.py medmeta_common/__init__.py server/__init__.py client/__init__.py \
    && .venv/bin/pip install -e . \
    && python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda); assert torch.version.cuda, 'a CPU-only torch was installed'"
COPY . .
RUN .venv/bin/pip install --no-deps -e . \
    && python -m compileall -q medmeta medmeta_common server client \
    && medmeta --version \
    && mkdir -p /config /pki /keys /data /state \
    && chown "${UID}:${GID}" /state \
    && chmod 0700 /state

USER medmeta
ENTRYPOINT ["/usr/bin/tini", "--", "medmeta"]
CMD ["site", "start", "--config", "/config/site.yaml"]

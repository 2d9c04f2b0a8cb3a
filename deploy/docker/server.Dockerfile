# syntax=docker/dockerfile:1
# The operator's aggregation server: a Flower SuperLink (TLS + SuperNode
# authentication) that runs the medmeta ServerApp. CPU only.
#
#   docker build -f deploy/docker/server.Dockerfile -t medmeta-server .
#   (from the repository root; deploy/compose/docker-compose.yaml does this for you)
#
# `medmeta server start` submits the run with `flwr run`, which builds the Flower app
# from the repository checkout ([tool.flwr.app] in pyproject.toml): the image holds
# the repository and an editable install of it, never a plain wheel.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# torch first, from the CPU index: the project's `torch>=2.8` is then already met.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The user the server runs as. Set them to the owner of the PKI files on the host
# (MEDMETA_UID/MEDMETA_GID in docker-compose.yaml): server.key is mode 0600.
ARG UID=10001
ARG GID=10001

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    VIRTUAL_ENV=/opt/medmeta/.venv \
    PATH=/opt/medmeta/.venv/bin:$PATH

# tini is PID 1: it forwards SIGTERM to medmeta and reaps the ServerApp processes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && test "${UID}" != 0 \
    && groupadd --gid "${GID}" medmeta \
    && useradd --uid "${UID}" --gid "${GID}" --create-home --shell /usr/sbin/nologin medmeta

WORKDIR /opt/medmeta
RUN python -m venv .venv \
    && .venv/bin/pip install --upgrade pip \
    && .venv/bin/pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

# Dependencies in their own layer (a code change does not reinstall them) ...
COPY pyproject.toml README.md ./
RUN mkdir -p medmeta medmeta_common server client \
    && touch medmeta/__init__.py medmeta_common/__init__.py server/__init__.py client/__init__.py \
    && .venv/bin/pip install -e . \
    && python -c "import torch; print('torch', torch.__version__)"
# ... then the code, installed editable (see .dockerignore for what stays out).
COPY . .
RUN .venv/bin/pip install --no-deps -e . \
    && python -m compileall -q medmeta medmeta_common server client \
    && medmeta --version \
    && mkdir -p /config /pki /sites /state \
    && chown "${UID}:${GID}" /state \
    && chmod 0700 /state

USER medmeta
EXPOSE 8000
# /state: superlink.db, superlink.log, run.json, checkpoints, metrics (a volume).
ENTRYPOINT ["/usr/bin/tini", "--", "medmeta"]
CMD ["server", "start", "--foreground", "--config", "/config/server.yaml"]

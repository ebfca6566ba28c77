"""Model executors, imported lazily so a CPU node never imports torch for `echo`."""
from __future__ import annotations

import importlib
import importlib.util
import threading
from typing import Any

from workers.executors.base import ExecContext, ExecutionError, Executor, Stopped

_REGISTRY = {
    "echo": "workers.executors.echo:EchoExecutor",
    "embedding": "workers.executors.embedding:EmbeddingExecutor",
    "resnet50": "workers.executors.resnet50:ResNet50Executor",
    "generic": "workers.executors.generic:GenericExecutor",
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


def loads_weights(model: str) -> bool:
    """Whether the model's executor loads weights before it can run (its class says `preload`):
    a node announces such a model only once its pool processes have loaded and warmed it."""
    target = _REGISTRY.get(model)
    if target is None:
        return False
    module_name, _, cls_name = target.partition(":")
    return bool(getattr(getattr(importlib.import_module(module_name), cls_name), "preload", False))


def reset_executors() -> None:
    _instances.clear()


__all__ = ["ExecContext", "ExecutionError", "Executor", "Stopped", "get_executor", "loads_weights", "reset_executors"]

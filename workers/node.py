"""What this compute node can run, and model warm-up in every pool process.

- The registry asks `refusals(queues)` at worker start (main process) and
  advertises the result, so the scheduler does not count this node for a
  model it refuses. `generic` is refused when no sandbox works here; `echo`
  shares `cpu.generic` and keeps running. A model whose executor's modules
  are not installed in this node's Python (torchvision for resnet50 outside
  `.venv-vision`) is refused too.
- `worker_process_init` warms the executors of the models this node consumes
  (in a thread: billiard kills a child that takes more than ~4 s to report
  up, and loading a model can take longer on a busy machine; the executors
  lock their lazy load, so a first subtask simply waits for it).
"""
from __future__ import annotations

import logging
import sys
import threading
from functools import cache, lru_cache
from typing import Any

from celery.signals import worker_init, worker_process_init

from marketplace.catalog import CONTROL_QUEUES, get_catalog
from marketplace.registry.signals import add_probe
from marketplace.settings import get_settings

logger = logging.getLogger(__name__)
SANDBOXED_MODELS = ("generic",)


def sandbox_problem() -> str | None:
    """Why `generic` cannot run on this node, or None when a sandbox works."""
    name = get_settings().sandbox
    try:
        from workers.sandbox import sandbox_status

        usable, why = sandbox_status(name)
    except Exception as exc:  # a sandbox backend that blows up is as unusable as a missing one
        return f"sandbox {name or '(none)'} failed its check: {type(exc).__name__}: {exc}"
    return None if usable else f"no usable sandbox for user code: {why}"


@lru_cache(maxsize=1)
def _cached_sandbox_problem() -> str | None:
    return sandbox_problem()


@cache
def _missing_modules_problem(model: str) -> str | None:
    missing = get_catalog().missing_modules(model)
    if not missing:
        return None
    hint = " (resnet50 nodes run from .venv-vision: `make vision`)" if "torchvision" in missing else ""
    return f"{', '.join(missing)} not installed in {sys.executable}{hint}"


def refusal(model: str) -> str | None:
    """Why this process refuses `model` (checked once per process), else None."""
    if model in SANDBOXED_MODELS:
        return _cached_sandbox_problem()
    return _missing_modules_problem(model)


def refusals(queues: list[str]) -> dict[str, str]:
    """{model: reason} for served models this node cannot run."""
    catalog = get_catalog()
    models = {m for q in queues for m in catalog.models_for_queue(q)}
    out = {}
    for model in sorted(models):
        reason = refusal(model)
        if reason:
            out[model] = reason
    return out


def served(queues: list[str]) -> list[tuple[str, str]]:
    """(model, device) pairs behind the consumed compute queues."""
    catalog = get_catalog()
    pairs = []
    for queue in queues:
        if queue in CONTROL_QUEUES:
            continue
        device = queue.split(".", 1)[0]
        pairs.extend((model, device) for model in catalog.models_for_queue(queue))
    return sorted(set(pairs))


def warm_up(pairs: list[tuple[str, str]]) -> None:
    from workers.executors import get_executor

    for model, device in pairs:
        if refusal(model):
            logger.warning("warm-up: skipping %s: %s", model, refusal(model))
            continue
        try:
            get_executor(model, device).warmup()
            logger.info("warm-up: %s on %s ready", model, device)
        except Exception as exc:  # the subtask will report the same error with its retry
            logger.warning("warm-up: %s on %s failed: %s", model, device, exc)


@worker_init.connect
def _record_pool_size(sender: Any = None, **_: Any) -> None:
    """Runs in the main process before the pool forks: children inherit the number."""
    from workers.executors import base

    base.POOL_SIZE = int(getattr(sender, "concurrency", None) or 1)


@worker_process_init.connect
def _warm_up_in_child(sender: Any = None, **_: Any) -> None:
    from marketplace.infra.celery_app import app

    if not get_settings().warmup_models:
        return
    pairs = served(sorted(app.amqp.queues.consume_from.keys()))
    if pairs:
        threading.Thread(target=warm_up, args=(pairs,), name="marketplace-warmup", daemon=True).start()


add_probe(refusals)

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
- A model whose executor loads weights (`preload`) is announced only once every
  pool process has loaded it and run one small inference: each process reports
  its outcome in a Redis hash of this node process (`WARMUP_KEY` + incarnation),
  and the main process's warm-up probe (`warmup_state`) turns the hash into
  `unavailable` reasons for the heartbeat: `registry.service.LOADING` until then,
  the error when the load failed, so the first job runs at warm speed and a node
  that cannot load a model refuses it, saying why.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import defaultdict
from functools import cache, lru_cache
from typing import Any

from celery.signals import worker_init, worker_process_init, worker_ready

from marketplace.catalog import CONTROL_QUEUES, get_catalog
from marketplace.registry.signals import add_fact_source, add_probe, add_warmup_probe, incarnation
from marketplace.settings import get_settings

logger = logging.getLogger(__name__)
SANDBOXED_MODELS = ("generic",)
WARMUP_KEY = "marketplace:warmup:"  # + incarnation: {"<model>@<device>:<pid>": "" (loaded) or why not}
WARMUP_KEY_TTL = 24 * 3600
# Pools that run tasks in the main process (no worker_process_init in their children): one warm-up there.
IN_PROCESS_POOLS = ("solo", "threads", "gevent", "eventlet")
_node: dict[str, Any] = {"reporters": 1, "in_process": False, "since": time.monotonic()}


def sandbox_problem() -> str | None:
    """Why `generic` cannot run on this node, or None when a sandbox works."""
    name = get_settings().sandbox
    try:
        from workers.sandbox import sandbox_status

        usable, why = sandbox_status(name)
    except Exception as exc:  # a sandbox backend that blows up is as unusable as a missing one
        return f"sandbox {name or '(none)'} failed its check: {type(exc).__name__}: {exc}"
    return None if usable else f"no usable sandbox for user code: {why}"


def sandbox_facts() -> dict[str, Any]:
    """How the configured sandbox is hardened here: {"sandbox": {name, memory, seccomp}} (node facts).

    A fallback (no cgroup: memory_mb bounds each process only; no seccomp filter) is logged as a
    warning at node start and shows here, in the node's heartbeat, for admins to see."""
    name = get_settings().sandbox
    if name in (None, "", "none"):
        return {}
    from workers.sandbox import get_sandbox

    try:
        box = get_sandbox(name)
    except Exception as exc:  # unusable: refusals() says why
        return {"sandbox": {"name": name, "error": str(exc)}}
    hardening = getattr(box, "hardening", None)
    details = hardening() if hardening else {"memory": "the container's cgroup (mem_limit)"}
    for key, value in details.items():
        if "NOT" in value or "NONE" in value:
            logger.warning("sandbox %s: %s: %s", name, key, value)
    return {"sandbox": {"name": name, **details}}


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
    """Load (and warm) each served model in this process; report those that load weights."""
    from workers.executors import get_executor, loads_weights

    for model, device in pairs:
        if refusal(model):
            logger.warning("warm-up: skipping %s: %s", model, refusal(model))
            continue
        error = None
        try:
            get_executor(model, device).warmup()
            logger.info("warm-up: %s on %s ready", model, device)
        except Exception as exc:  # the node refuses it, saying this; a subtask would meet the same error
            error = f"could not load it on {device}: {type(exc).__name__}: {exc}"
            logger.warning("warm-up: %s on %s failed: %s", model, device, exc)
        if loads_weights(model):
            _report(model, device, error)


def _report(model: str, device: str, error: str | None) -> None:
    from marketplace.infra.redis_client import get_redis

    key = WARMUP_KEY + (incarnation() or "")
    try:
        pipe = get_redis().pipeline(transaction=False)
        pipe.hset(key, f"{model}@{device}:{os.getpid()}", error or "")
        pipe.expire(key, WARMUP_KEY_TTL)
        pipe.execute()
    except Exception as exc:  # the node then announces the model after warmup_timeout, refused
        logger.warning("warm-up: could not report %s on %s: %s", model, device, exc)


def warmup_state(queues: list[str]) -> dict[str, str]:
    """{model: reason} for the served models (of an executor that loads weights) not loaded yet in
    every pool process (registry.service.LOADING, or a timeout), or that failed to load (its error).
    The main process's warm-up probe: the registry heartbeats it as part of `unavailable`."""
    from marketplace.infra.redis_client import get_redis
    from marketplace.registry.service import LOADING
    from workers.executors import loads_weights

    settings = get_settings()
    if not settings.warmup_models:
        return {}
    pairs = [(model, device) for model, device in served(queues) if not refusal(model) and loads_weights(model)]
    if not pairs:
        return {}
    loaded: dict[str, set[str]] = defaultdict(set)
    failed: dict[str, str] = {}
    for field, value in get_redis().hgetall(WARMUP_KEY + (incarnation() or "")).items():
        name, _, pid = field.decode().rpartition(":")
        if value:
            failed[name] = value.decode()
        else:
            loaded[name].add(pid)
    late = time.monotonic() - _node["since"] > settings.warmup_timeout
    out: dict[str, str] = {}
    for model, device in pairs:
        name = f"{model}@{device}"
        if name in failed:
            out[model] = failed[name]
        elif len(loaded[name]) < _node["reporters"]:
            out.setdefault(model, f"not loaded on {device} after {settings.warmup_timeout:g} s" if late else LOADING)
    return out


@worker_init.connect
def _record_pool_size(sender: Any = None, **_: Any) -> None:
    """Runs in the main process before the pool forks: children inherit the number."""
    from workers.executors import base

    base.POOL_SIZE = int(getattr(sender, "concurrency", None) or 1)
    pool = getattr(sender, "pool_cls", None)
    pool_name = str(getattr(pool, "__module__", None) or pool)
    _node["in_process"] = any(name in pool_name for name in IN_PROCESS_POOLS)
    # Each pool process loads its own copy: all of them report before the model is announced.
    _node["reporters"] = 1 if _node["in_process"] else base.POOL_SIZE
    _node["since"] = time.monotonic()


def _start_warm_up() -> None:
    from marketplace.infra.celery_app import app

    if not get_settings().warmup_models:
        return
    pairs = served(sorted(app.amqp.queues.consume_from.keys()))
    if pairs:
        threading.Thread(target=warm_up, args=(pairs,), name="marketplace-warmup", daemon=True).start()


@worker_process_init.connect
def _warm_up_in_child(sender: Any = None, **_: Any) -> None:
    _start_warm_up()  # a prefork child, or the main process of a solo pool


@worker_ready.connect
def _warm_up_in_threads_pool(sender: Any = None, **_: Any) -> None:
    """A threads (gevent, eventlet) pool sends no worker_process_init: its one warm-up runs here."""
    if _node["in_process"] and "solo" not in str(getattr(getattr(sender, "pool", None), "__module__", "")):
        _start_warm_up()


add_probe(refusals)
add_fact_source(sandbox_facts)
add_warmup_probe(warmup_state)

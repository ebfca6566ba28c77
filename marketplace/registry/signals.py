"""Node lifecycle: register on worker_ready, heartbeat from a thread, deregister on shutdown.

All of this runs in the worker's main process. The number of running subtasks
is read there from `celery.worker.state.active_requests`: the main process
adds a request when a pool child accepts it and drops it when the child
reports the result *or dies*, so the count heals itself after a SIGKILLed
child. A Redis counter bumped by `task_prerun`/`task_postrun` in the children
would leak one on every killed child (postrun never fires) and costs two
writes per subtask.

A node announces a model only once its pool has loaded it: until then the model is listed in
`unavailable` as `service.LOADING` (the scheduler counts no slot of it), a model that failed to
load is listed with the reason, and each change is heartbeated at once (polled every 0.2 s while
something loads), written to the node's row, and wakes the tasks waiting for it. What is loaded
is told by the warm-up probes (`workers/node.py`).

Each worker main process is an incarnation of its node: an id made at `worker_init`, before the
pool forks (its children inherit it and write it with every claim), and heartbeated with the
node's record. A node restarted under the same name heartbeats a new one, so the Running rows
its killed predecessor left are known dead at once (`registry.service.claim_alive`), and its
`wake` has them taken over (`scheduling.orphans`).
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from celery.signals import worker_init, worker_ready, worker_shutdown

from marketplace.catalog import get_catalog
from marketplace.infra import names
from marketplace.settings import get_settings

logger = logging.getLogger(__name__)
RUN_SUBTASK, WAKE_TASK = names.RUN_SUBTASK, names.WAKE
_stop = threading.Event()
_info: dict[str, Any] = {}
_process: dict[str, str] = {}  # this node process's incarnation, once the worker starts

# Probes say which served models this node cannot run, and why: {model: reason}.
# `workers` adds the sandbox probe; `marketplace` never imports `workers`.
Probe = Callable[[list[str]], dict[str, str]]
_probes: list[Probe] = []


# A credentialed node reports to the platform's NodeService instead of writing the registry
# itself (`workers.backends.NodeReporter`): `beat(info)`, `leave()`.
_reporter: dict[str, Any] = {}


def set_reporter(reporter: Any) -> None:
    _reporter["r"] = reporter


def add_probe(probe: Probe) -> None:
    if probe not in _probes:
        _probes.append(probe)


# Warm-up probes say which served models are not loaded yet in this node's pool (service.LOADING)
# or could not be loaded (the reason): asked again at every beat.
_warmup_probes: list[Probe] = []
_announced: dict[str, str] = {}  # the warm-up state the last heartbeat carried
WARMUP_POLL = 0.2  # seconds between looks while a model loads


def add_warmup_probe(probe: Probe) -> None:
    if probe not in _warmup_probes:
        _warmup_probes.append(probe)


def warmup_state(queues: list[str]) -> dict[str, str]:
    return _ask(_warmup_probes, queues)


def unavailable_models(queues: list[str]) -> dict[str, str]:
    return _ask(_probes, queues)


def _ask(probes: list[Probe], queues: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for probe in probes:
        try:
            out.update(probe(queues))
        except Exception as exc:  # a broken probe must not stop the node registering
            logger.exception("registry: capability probe %r failed", probe)
            out.setdefault("?", f"probe failed: {exc}")
    return out


# Fact sources add to a node's `facts` (admins see them in GET /v1/workers): {name: value}.
# `workers` adds how its sandbox is hardened (memory cgroups, seccomp), or why it is not.
FactSource = Callable[[], dict[str, Any]]
_fact_sources: list[FactSource] = []


def add_fact_source(source: FactSource) -> None:
    if source not in _fact_sources:
        _fact_sources.append(source)


def extra_facts() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for source in _fact_sources:
        try:
            out.update(source())
        except Exception as exc:  # a broken source must not stop the node registering
            logger.exception("registry: fact source %r failed", source)
            out.setdefault("fact_errors", []).append(str(exc))
    return out


def incarnation() -> str | None:
    """This node process's id (inherited by its pool children); None outside a worker."""
    return _process.get("incarnation")


@worker_init.connect
def _new_incarnation(**_: Any) -> None:
    """In the main process, before the pool forks: its children claim with this id."""
    _process["incarnation"] = uuid.uuid4().hex


def running_subtasks() -> int:
    """Subtasks this node's pool is executing now (main process only)."""
    from celery.worker import state

    for _ in range(3):
        try:  # the consumer thread mutates the set while we read it
            return sum(1 for req in list(state.active_requests) if req.name == RUN_SUBTASK)
        except RuntimeError:
            time.sleep(0.01)
    return 0


def node_info(consumer: Any) -> dict[str, Any]:
    from marketplace.registry.facts import node_facts

    # Not its own queue (`<hostname>.dq2`, Celery's worker_direct: verified replicas are sent there).
    queues = sorted(q for q in consumer.app.amqp.queues.consume_from if not q.endswith(".dq2"))
    catalog = get_catalog()
    models = sorted({m for q in queues for m in catalog.models_for_queue(q)})
    concurrency = getattr(getattr(consumer, "pool", None), "limit", None) or getattr(
        consumer.controller, "concurrency", 1
    )
    unavailable = unavailable_models(queues)
    for model, reason in unavailable.items():
        logger.warning("registry: this node will NOT run %r: %s", model, reason)
    return {
        "hostname": consumer.hostname,
        "queues": queues,
        "models": models,
        "unavailable": unavailable,
        "concurrency": int(concurrency or 1),
        "pid": os.getpid(),
        "incarnation": incarnation(),
        "started_at": time.time(),
        "facts": {**node_facts(), **extra_facts()},
    }


def _current() -> dict[str, Any]:
    """The node's record as announced now: what it refuses, with what its pool has not loaded."""
    return {**_info, "unavailable": {**_info["unavailable"], **_announced}}


def _beat_once() -> None:
    if "r" in _reporter:
        try:
            _reporter["r"].beat({**_current(), "running": running_subtasks()})
        except Exception as exc:
            logger.warning("registry: heartbeat to the platform failed: %s", exc)
        return
    from marketplace.infra.redis_client import get_redis
    from marketplace.registry.service import heartbeat

    try:
        heartbeat(get_redis(), info={**_current(), "running": running_subtasks()})
    except Exception as exc:  # a Redis blip must stop neither the start nor the heartbeat thread
        logger.warning("registry: heartbeat failed: %s", exc)


def _look_at_warmup() -> bool:
    """Read the warm-up state; on a change, announce it (heartbeat, row, wake). Whether it changed."""
    from marketplace.registry.service import LOADING

    state = warmup_state(_info["queues"]) if _warmup_probes else {}
    if state == _announced:
        return False
    before = set(_announced)
    _announced.clear()
    _announced.update(state)
    for model in sorted(before - set(state)):
        logger.info("registry: node %s now runs %r (loaded)", _info["hostname"], model)
    for model, reason in sorted(state.items()):
        if reason != LOADING:
            logger.warning("registry: this node will NOT run %r: %s", model, reason)
    _beat_once()
    _record_online(_current())
    if before - set(state):
        _wake_waiting(_current())
    return True


def _loading() -> bool:
    from marketplace.registry.service import LOADING

    return any(reason == LOADING for reason in _announced.values())


def _beat_forever() -> None:
    interval = get_settings().heartbeat_interval
    last = time.monotonic()
    while not _stop.wait(WARMUP_POLL if _loading() else interval):
        if _loading() and _look_at_warmup():
            last = time.monotonic()
            continue
        if time.monotonic() - last >= interval - WARMUP_POLL / 2:
            if not _look_at_warmup():
                _beat_once()
            last = time.monotonic()


def _record_online(info: dict[str, Any]) -> None:
    from marketplace.infra.db import session_scope
    from marketplace.registry.service import record_online

    try:
        with session_scope() as session:
            record_online(session, info=info)
    except Exception as exc:  # the heartbeat is what matters; the sweep writes the row later
        logger.warning("registry: could not record %s in the database: %s", info["hostname"], exc)


def _wake_waiting(info: dict[str, Any]) -> None:
    """Tasks waiting for what this node serves need not sit out their backoff, and the subtasks a
    predecessor under this name left Running are re-sent now (it is gone: this process replaced it)."""
    runnable = [m for m in info["models"] if m not in info["unavailable"]]
    compute = [q for q in info["queues"] if q not in names.CONTROL_QUEUES]
    if not runnable or not compute:
        return
    try:
        from marketplace.infra.celery_app import app

        app.send_task(WAKE_TASK, args=[compute, runnable], kwargs={"hostname": info["hostname"]},
                      queue=names.SCHEDULER_QUEUE, ignore_result=True)
    except Exception as exc:
        logger.warning("registry: could not wake waiting tasks: %s", exc)


@worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    _info.clear()
    _info.update(node_info(sender))
    _announced.clear()
    _announced.update(warmup_state(_info["queues"]) if _warmup_probes else {})
    _stop.clear()
    if "r" in _reporter:  # the platform records it online and wakes waiting tasks at its first beat
        _beat_once()
    else:
        # The row first: once the heartbeat key is visible the durable record exists too.
        _record_online(_current())
        _beat_once()  # before `wake`: it tells the predecessor's rows from ours by the live record
        _wake_waiting(_current())
    threading.Thread(target=_beat_forever, name="marketplace-heartbeat", daemon=True).start()
    logger.info("registry: node %s online for %s%s", _info["hostname"], ",".join(_info["queues"]),
                f" (loading {', '.join(sorted(_announced))})" if _loading() else "")


@worker_shutdown.connect
def _on_shutdown(**_: Any) -> None:
    _stop.set()
    if not _info:
        return
    if "r" in _reporter:
        try:
            _reporter["r"].leave()
        except Exception as exc:
            logger.warning("registry: could not tell the platform this node leaves: %s", exc)
        return
    from marketplace.infra.db import session_scope
    from marketplace.infra.redis_client import get_redis
    from marketplace.registry.service import deregister, record_offline

    hostname = _info["hostname"]
    try:
        deregister(get_redis(), hostname=hostname)
    except Exception as exc:
        logger.warning("registry: could not deregister %s: %s", hostname, exc)
    try:
        with session_scope() as session:
            record_offline(session, hostname=hostname)
    except Exception as exc:
        logger.warning("registry: could not mark %s offline in the database: %s", hostname, exc)
    logger.info("registry: node %s deregistered", hostname)

"""Audit records from Celery signals: publishes, subtask lifecycle, worker online/offline.

Per-subtask records go through `service.subtask_record` (by default a lock-free
INSERT into `audit_pending`, chained in batches), so subtasks never wait on each
other or on the chain head. Rare events (a worker starting) are chained directly.
A handler never raises: a failed audit write is logged loudly, the task goes on.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery.signals import (
    before_task_publish,
    task_failure,
    task_postrun,
    task_prerun,
    task_retry,
    task_revoked,
    task_success,
    worker_ready,
    worker_shutdown,
)

from marketplace.audit import service
from marketplace.infra import names

logger = logging.getLogger(__name__)
SUBTASK, SCHEDULE, CHAIN_TASK = names.RUN_SUBTASK, names.SCHEDULE, names.CHAIN_AUDIT
FLUSH_AT = 1000
_published = threading.local()


def _platform_only(handler: Any) -> Any:
    """A handler that writes the platform's audit log: not run on a credentialed node, which has
    no database (the platform writes its records: `marketplace.providers.work`)."""
    import functools

    @functools.wraps(handler)
    def run(*args: Any, **kwargs: Any) -> None:
        from marketplace.settings import get_settings

        if not get_settings().is_node:
            handler(*args, **kwargs)

    return run


def _safe(fn: Any, *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except Exception:  # an audit failure must be visible but must not fail the task
        logger.exception("audit: could not record %s", kwargs.get("action") or getattr(fn, "__name__", fn))


def _arg0(args: Any) -> str | None:
    try:
        return str(args[0]) if args else None
    except (TypeError, IndexError, KeyError):
        return None


# --- publishing ------------------------------------------------------------------------

def _buffer() -> list[tuple[str, str, str | None]]:
    if not hasattr(_published, "items"):
        _published.items = []
    return _published.items  # type: ignore[no-any-return]


@contextmanager
def dispatching(task_id: str) -> Iterator[None]:
    """Subtasks published inside belong to `task_id`, and their `task.dispatched` record is
    written on the way out: the hook does not look their task up (a SELECT of every subtask
    id after each dispatch: ~2% of a 1,000-subtask fan-out's CPU), and a dispatch from outside
    a task (`marketplace recover`) is recorded too, with no task_postrun to flush it."""
    _published.task_id = task_id
    try:
        yield
    finally:
        _published.task_id = None
        _safe(flush_published)


def flush_published() -> None:
    """One `task.dispatched` record per task for the subtasks published since the last flush."""
    items = _buffer()
    if not items:
        return
    batch, items[:] = list(items), []
    import uuid

    from sqlalchemy import select

    from marketplace.infra.db import session_scope
    from marketplace.tasks.models import SubTask

    unknown = [uuid.UUID(sid) for sid, _queue, tid in batch if tid is None]  # e.g. a retry's re-publish
    if not unknown:
        # A dispatch's usual case: one statement that commits by itself, not a transaction.
        service.enqueue_now(_dispatched_records(batch, {}))
        return
    with session_scope() as session:
        owners = {str(sid): str(tid) for sid, tid in session.execute(
            select(SubTask.id, SubTask.task_id).where(SubTask.id.in_(unknown))).all()} if unknown else {}
        for record in _dispatched_records(batch, owners):
            service.enqueue(session, **record)


def _dispatched_records(batch: list[tuple[str, str, str | None]], owners: dict[str, str]) -> list[dict[str, Any]]:
    """One `task.dispatched` record per task: how many of its subtasks were published, to which queues."""
    import uuid

    per_task: dict[str, dict[str, Any]] = defaultdict(lambda: {"subtasks": 0, "queues": set()})
    for sid, queue, known in batch:
        tid = known or owners.get(str(uuid.UUID(sid))) or "unknown"
        per_task[tid]["subtasks"] += 1
        per_task[tid]["queues"].add(queue)
    return [{"actor": "scheduler", "action": "task.dispatched", "subject": f"task:{tid}",
             "task_id": None if tid == "unknown" else tid,
             "data": {"subtasks": info["subtasks"], "queues": sorted(info["queues"])}}
            for tid, info in per_task.items()]


@before_task_publish.connect
@_platform_only
def _on_publish(sender: Any = None, headers: Any = None, body: Any = None, routing_key: Any = None, **_: Any) -> None:
    name = sender if isinstance(sender, str) else (headers or {}).get("task")
    args = body[0] if isinstance(body, (list, tuple)) and body else (headers or {}).get("argsrepr")
    if name == SUBTASK:
        sid = _arg0(args)
        if sid:
            # Batched: a chord of N subtasks becomes one record, written after the publishing task.
            _buffer().append((sid, str(routing_key or ""), getattr(_published, "task_id", None)))
            if len(_buffer()) >= FLUSH_AT:
                _safe(flush_published)
    elif name == SCHEDULE and not (headers or {}).get("marketplace_audited"):
        # A submit's first scheduling message is named by its task.created record (tasks.service).
        tid = _arg0(args)
        _safe(service.subtask_record, actor="api", action="task.schedule_requested", subject=f"task:{tid}",
              task_id=tid, data={"celery_id": (headers or {}).get("id")})


# --- execution -------------------------------------------------------------------------

def _hostname(task: Any) -> str:
    return str(getattr(getattr(task, "request", None), "hostname", None) or "unknown")


@task_prerun.connect
@_platform_only
def _on_prerun(sender: Any = None, task_id: Any = None, task: Any = None, args: Any = None, **_: Any) -> None:
    if getattr(task or sender, "name", None) != SUBTASK:
        return
    sid = _arg0(args)
    t = task or sender
    record = {"actor": f"worker:{_hostname(t)}", "action": "subtask.started", "subject": f"subtask:{sid}",
              "data": {"celery_id": task_id, "retries": getattr(t.request, "retries", 0)}}
    # Written by the subtask's claim statement (`lifecycle.claim`), not a commit of its own.
    _safe(service.carry_subtask_record, **record)


@task_postrun.connect
@_platform_only
def _on_postrun(**_: Any) -> None:
    _safe(flush_published)


@task_success.connect
@_platform_only
def _on_success(sender: Any = None, result: Any = None, **_: Any) -> None:
    # A subtask's outcome record is written by its outcome's statement (`lifecycle`).
    if getattr(sender, "name", None) == names.FINALIZE and result in ("done", "failed"):
        # The task just ended: chain its buffered subtask records soon, on the maintenance queue.
        _safe(request_chaining)


# A chain request runs this long after it is sent; while one is pending, no other is sent.
CHAIN_DELAY = 1.0
_CHAIN_REQUESTED = "marketplace:audit:chain-requested"


def request_chaining() -> None:
    """Chain the buffered records soon (a task just ended), on the maintenance queue.

    At most one request per CHAIN_DELAY: one sent less than CHAIN_DELAY ago runs after this
    caller's records were committed (they were, before it asked), so it chains them too. Under
    a stream of small jobs that is one chaining run a second instead of one per job (each was a
    message, an advisory lock and a read: a fifth of a pool process's time, measured).
    """
    from redis.exceptions import RedisError

    from marketplace.infra.celery_app import app
    from marketplace.infra.redis_client import get_redis

    redis = get_redis()
    try:
        # The marker expires when the pending request's countdown does, or before.
        if not redis.set(_CHAIN_REQUESTED, 1, nx=True, px=int(CHAIN_DELAY * 1000)):
            return
    except RedisError:
        pass  # ask anyway; the beat's periodic chaining is the backstop either way
    try:
        # A second later: the last subtask's own success handlers run after the chord counter moved.
        app.send_task(CHAIN_TASK, queue=names.MAINTENANCE_QUEUE, countdown=CHAIN_DELAY, ignore_result=True)
    except Exception:
        with contextlib.suppress(RedisError):
            redis.delete(_CHAIN_REQUESTED)  # nothing is pending: the next caller asks again
        raise


@task_failure.connect
@_platform_only
def _on_failure(sender: Any = None, task_id: Any = None, exception: Any = None, args: Any = None, **_: Any) -> None:
    name = getattr(sender, "name", None)
    error = f"{type(exception).__name__}: {exception}"[:2000]
    if name == SUBTASK:
        sid = _arg0(args)
        _safe(service.subtask_record, actor=f"worker:{_hostname(sender)}", action="subtask.crashed",
              subject=f"subtask:{sid}", subtask_id=sid, data={"celery_id": task_id, "error": error})
    elif name:
        _safe(service.record, actor=f"worker:{_hostname(sender)}", action="celery.task_failed",
              subject=f"celery:{name}", data={"celery_id": task_id, "args": repr(args)[:500], "error": error},
              pending=True)


@task_retry.connect
@_platform_only
def _on_retry(sender: Any = None, request: Any = None, reason: Any = None, **_: Any) -> None:
    if getattr(sender, "name", None) != SUBTASK:
        return
    sid = _arg0(getattr(request, "args", None))
    _safe(service.subtask_record, actor=f"worker:{getattr(request, 'hostname', None) or 'unknown'}",
          action="subtask.retried", subject=f"subtask:{sid}", subtask_id=sid,
          data={"reason": str(reason)[:2000], "retries": getattr(request, "retries", None)})


@task_revoked.connect
@_platform_only
def _on_revoked(sender: Any = None, request: Any = None, terminated: Any = None, signum: Any = None,
                expired: Any = None, **_: Any) -> None:
    name = getattr(sender, "name", None) or getattr(request, "task", None) or getattr(request, "name", None)
    args = getattr(request, "args", None)
    data = {"celery_id": getattr(request, "id", None), "terminated": bool(terminated),
            "signum": str(signum) if signum is not None else None, "expired": bool(expired), "task": str(name)}
    if name == SUBTASK:
        sid = _arg0(args)
        _safe(service.subtask_record, actor="celery", action="subtask.revoked", subject=f"subtask:{sid}",
              subtask_id=sid, data=data)
    else:
        _safe(service.record, actor="celery", action="celery.task_revoked", subject=f"celery:{name}", data=data,
              pending=True)


# --- worker lifecycle ------------------------------------------------------------------

@worker_ready.connect
@_platform_only
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    hostname = str(getattr(sender, "hostname", "unknown"))
    queues = sorted(getattr(getattr(getattr(sender, "app", None), "amqp", None), "queues", {}).consume_from.keys()) \
        if sender is not None and hasattr(sender, "app") else []
    _safe(service.record, actor=f"worker:{hostname}", action="worker.online", subject=f"worker:{hostname}",
          data={"queues": queues})


@worker_shutdown.connect
@_platform_only
def _on_worker_shutdown(sender: Any = None, **_: Any) -> None:
    hostname = str(getattr(sender, "hostname", "unknown"))
    _safe(service.record, actor=f"worker:{hostname}", action="worker.offline", subject=f"worker:{hostname}", data={})

"""Execute one subtask: load inputs, run the model, store the part, record the outcome.

The database row is the truth: a redelivered subtask that already finished returns
its recorded outcome without running again, and its part key is deterministic.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from marketplace.db import session_scope, utcnow
from marketplace.events.outbox import emit
from marketplace.results.service import fail_task, part_key, run_after_commit
from marketplace.storage import StorageError, get_store
from marketplace.tasks.models import FINAL_TASK_STATUSES, SubTask, SubTaskStatus, Task, TaskStatus
from workers.executors import ExecContext, ExecutionError, get_executor

logger = logging.getLogger(__name__)
FINAL_TASK_VALUES = {s.value for s in FINAL_TASK_STATUSES}


@dataclass
class Retry:
    """Ask the Celery task to retry later."""

    error: str
    infrastructure: bool = False


def _outcome(sub: SubTask, task: Task, **extra: Any) -> dict[str, Any]:
    return {
        "subtask_id": str(sub.id), "task_id": str(task.id), "user_id": str(task.user_id),
        "model": task.model, "device": (task.queue or "cpu.").split(".", 1)[0], "index": sub.index,
        "items": sub.items, **extra,
    }


def _start(subtask_id: str, hostname: str) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Mark Running (and the task InProgress); returns (early outcome, work)."""
    with session_scope() as session:
        row = session.execute(
            select(SubTask, Task).join(Task, SubTask.task_id == Task.id).where(SubTask.id == uuid.UUID(subtask_id))
        ).first()
        if row is None:
            return {"ok": False, "skipped": True, "subtask_id": None, "error": f"unknown subtask {subtask_id}"}, {}
        sub, task = row
        if task.status in FINAL_TASK_VALUES:
            return _outcome(sub, task, ok=False, skipped=True, error=f"task is {task.status}"), {}
        if sub.status == SubTaskStatus.DONE.value:
            return _outcome(sub, task, ok=True, duplicate=True, key=sub.result_key, sha256=sub.result_sha256,
                            seconds=sub.seconds), {}
        if sub.status == SubTaskStatus.FAILED.value:
            return _outcome(sub, task, ok=False, duplicate=True, error=sub.error, seconds=sub.seconds), {}
        now = utcnow()
        sub.status = SubTaskStatus.RUNNING.value
        sub.attempts += 1
        sub.worker = hostname
        sub.started_at = sub.started_at or now
        # The first subtask to start moves the task on; the WHERE makes it a no-op after.
        session.execute(
            update(Task).where(Task.id == task.id, Task.status == TaskStatus.SCHEDULED.value)
            .values(status=TaskStatus.IN_PROGRESS.value, started_at=now)
        )
        work = {
            "inputs": sub.inputs, "params": task.params or {}, "base": _outcome(sub, task),
            "attempts": sub.attempts,
        }
        return None, work


def _record(subtask_id: str, *, ok: bool, fields: dict[str, Any], fail_reason: str | None = None) -> None:
    actions: list[tuple[str, str]] = []
    with session_scope() as session:
        sub = session.get(SubTask, uuid.UUID(subtask_id))
        assert sub is not None
        for name, value in fields.items():
            setattr(sub, name, value)
        sub.finished_at = utcnow()
        if ok:
            emit(session, type="SubTaskCompleted", key=str(sub.task_id), payload={
                "task_id": str(sub.task_id), "subtask_id": subtask_id, "index": sub.index, "status": sub.status,
                "items": sub.items, "seconds": sub.seconds, "worker": sub.worker,
            })
        if fail_reason:
            # Short-circuit: the task cannot succeed, so it ends now and siblings skip.
            task = session.scalar(select(Task).where(Task.id == sub.task_id).with_for_update())
            if task is not None:
                fail_task(session, task=task, error=fail_reason)
            actions = session.info.pop("after_commit", [])
    run_after_commit(actions)


def _back_to_pending(subtask_id: str, error: str) -> None:
    with session_scope() as session:
        session.execute(
            update(SubTask).where(SubTask.id == uuid.UUID(subtask_id), SubTask.status == SubTaskStatus.RUNNING.value)
            .values(status=SubTaskStatus.PENDING.value, error=error)
        )


def execute(subtask_id: str, *, hostname: str, retries_left: bool) -> dict[str, Any] | Retry:
    """Run a subtask to a final outcome dict, or return Retry."""
    try:
        early, work = _start(subtask_id, hostname)
    except OperationalError as exc:
        return Retry(f"database unavailable: {exc.orig}", infrastructure=True)
    if early is not None:
        return early
    base = work["base"]
    index = base["index"]
    started = time.perf_counter()
    try:
        executor = get_executor(base["model"], base["device"])
        ctx = ExecContext(task_id=base["task_id"], subtask_id=subtask_id, user_id=base["user_id"],
                          device=base["device"], store=get_store())
        outputs = executor.run(work["inputs"], work["params"], ctx)
        if len(outputs) != base["items"]:
            raise ExecutionError(f"model returned {len(outputs)} outputs for {base['items']} items")
        data = json.dumps(outputs, separators=(",", ":")).encode()
        key = part_key(base["task_id"], index)
        sha = get_store().put_bytes(key, data, "application/json")
    except ExecutionError as exc:
        return _failure(subtask_id, base, str(exc), started, retryable=exc.retryable and retries_left)
    except StorageError as exc:
        return _failure(subtask_id, base, f"object store: {exc}", started, retryable=retries_left)
    except Exception as exc:  # the model crashed: retry, then fail with the reason
        logger.exception("subtask %s crashed", subtask_id)
        return _failure(subtask_id, base, f"{type(exc).__name__}: {exc}", started, retryable=retries_left)
    seconds = round(time.perf_counter() - started, 6)
    try:
        _record(subtask_id, ok=True, fields={
            "status": SubTaskStatus.DONE.value, "result_key": key, "result_sha256": sha,
            "seconds": seconds, "error": None,
        })
    except OperationalError as exc:
        return Retry(f"database unavailable: {exc.orig}", infrastructure=True)
    return {**base, "ok": True, "key": key, "sha256": sha, "seconds": seconds}


def _failure(subtask_id: str, base: dict[str, Any], error: str, started: float, *, retryable: bool) -> dict[str, Any] | Retry:
    seconds = round(time.perf_counter() - started, 6)
    if retryable:
        logger.warning("subtask %s attempt failed, will retry: %s", subtask_id, error)
        _back_to_pending(subtask_id, error)
        return Retry(error)
    logger.error("subtask %s failed: %s", subtask_id, error)
    _record(subtask_id, ok=False, fields={"status": SubTaskStatus.FAILED.value, "error": error, "seconds": seconds},
            fail_reason=f"subtask {base['index']} failed: {error}")
    return {**base, "ok": False, "error": error, "seconds": seconds}

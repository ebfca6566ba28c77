"""Subtask progress on the hot path, in lean Core SQL.

Every subtask makes these calls, so each is one or two round trips on a plain
connection (no ORM unit of work): a fan-out of thousands of subtasks spends its
time running models, not in the ORM.
"""
from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import text

from marketplace.catalog import get_catalog
from marketplace.events.outbox import emit, topic_for
from marketplace.infra.db import autocommit, get_engine, session_scope, utcnow
from marketplace.infra.prepared import Prepared
from marketplace.settings import get_settings

_LOAD = text("""
    SELECT s.task_id, s.index, s.items, s.status, s.inputs, s.result_key, s.result_sha256, s.seconds, s.error, s.worker,
           s.worker_incarnation, s.celery_id, s.started_at, s.attempts,
           t.status AS task_status, t.user_id, t.model, t.queue, t.params
    FROM subtasks s JOIN tasks t ON t.id = s.task_id
    WHERE s.id = :id
""")

# Running, and the task InProgress; the WHERE on the task makes the second part a no-op after the first.
_CLAIM = text("""
    WITH s AS (
        UPDATE subtasks SET status = 'Running', attempts = attempts + 1, worker = :worker,
               worker_incarnation = :inc, celery_id = :mid, started_at = :now, error = NULL
        WHERE id = :id AND status IN ('Pending', 'Running')
        RETURNING task_id, attempts
    ), t AS (
        UPDATE tasks SET status = 'InProgress', started_at = :now
        FROM s WHERE tasks.id = s.task_id AND tasks.status = 'Scheduled'
        RETURNING tasks.id
    )
    SELECT attempts FROM s
""")

# Also answers which of the task's other subtasks this statement saw open: Pending ones, and
# Running ones (see `was_last`). Billing appends its charge to these CTEs (one statement per
# finished subtask: `billing.subtask_charges.complete_and_charge`).
# One equality per status, so both columns of ix_subtasks_task_status bound the scan: with
# `status IN (...)` the cached plan kept only task_id as its index condition and walked past
# every Done sibling first ('Done' sorts before 'Pending'), O(N) per completion, O(N^2) a job.
COMPLETE_CTES = """
    s AS (
        UPDATE subtasks SET status = 'Done', result_key = :key, result_sha256 = :sha, seconds = :seconds,
               finished_at = :now, error = NULL
        WHERE id = :id
        RETURNING task_id, index, items, worker, attempts
    ), o AS (
        INSERT INTO outbox_events (topic, key, type, payload, created_at)
        SELECT :topic, s.task_id::text, 'SubTaskCompleted',
               jsonb_build_object('task_id', s.task_id::text, 'user_id', t.user_id::text, 'subtask_id', :sid,
                                  'index', s.index, 'status', 'Done', 'items', s.items, 'seconds', :seconds,
                                  'worker', s.worker, 'attempts', s.attempts, 'result_key', :key,
                                  'result_sha256', :sha),
               :now
        FROM s JOIN tasks t ON t.id = s.task_id
        RETURNING id
    )
"""
# The Running probe only when no Pending sibling is left (evaluating both at every completion
# measured 1.76-1.90x at N=5000 against ~1.5x).
COMPLETE_RESULT = """
    CASE WHEN EXISTS (SELECT 1 FROM subtasks x WHERE x.task_id = s.task_id AND x.status = 'Pending') THEN 'pending'
         WHEN EXISTS (SELECT 1 FROM subtasks x WHERE x.task_id = s.task_id AND x.status = 'Running' AND x.id <> :id)
         THEN 'running'
    END AS open_left,
    t.subtask_count, s.task_id
"""
_COMPLETE = text(f"WITH {COMPLETE_CTES} SELECT {COMPLETE_RESULT} FROM s JOIN tasks t ON t.id = s.task_id")
_OPEN_LEFT = Prepared("mp_open_left", """
    SELECT EXISTS (SELECT 1 FROM subtasks WHERE task_id = :task_id AND status = 'Pending')
        OR EXISTS (SELECT 1 FROM subtasks WHERE task_id = :task_id AND status = 'Running')
""", types={"task_id": "uuid"})


def was_last(conn: Any, row: Any) -> bool:
    """Whether the completion `row` (COMPLETE_RESULT's, committed) left its task no open subtask.

    Its statement saw the others as of its start: subtasks finishing at once may each see the
    others still Running, and none would be the last (the task then waited for its chord
    callback, or for recovery where the chord was only partly sent). One that saw only Running
    siblings looks again, after its commit: the last of them to commit sees none open. Several
    may answer yes; finalize takes the task's lock and the others find it final. One that saw
    a Pending sibling is not the last: that sibling completes after it.
    """
    if row.open_left is None:
        return True
    if row.open_left == "pending":
        return False
    return not _OPEN_LEFT.execute(conn, {"task_id": row.task_id}).scalar()

# The common case in one round trip: a Pending subtask of a live task becomes Running, the task
# InProgress, and task_prerun's carried `subtask.started` record (:ts/:actor/... NULL when there is
# none) is written. Anything else (redelivery, a task that ended) takes the checked path below.
_CLAIM_PENDING = Prepared("mp_claim_pending", """
    WITH s AS (
        UPDATE subtasks SET status = 'Running', attempts = subtasks.attempts + 1, worker = :worker,
               worker_incarnation = :inc, celery_id = :mid, started_at = :now, error = NULL
        FROM tasks t
        WHERE subtasks.id = :id AND subtasks.status = 'Pending'
          AND t.id = subtasks.task_id AND t.status IN ('Scheduled', 'InProgress')
        RETURNING subtasks.task_id, subtasks.index, subtasks.items, subtasks.inputs, subtasks.attempts,
                  t.user_id, t.model, t.queue, t.params
    ), t AS (
        UPDATE tasks SET status = 'InProgress', started_at = :now
        FROM s WHERE tasks.id = s.task_id AND tasks.status = 'Scheduled'
        RETURNING tasks.id
    ), a AS (
        INSERT INTO audit_pending (ts, actor, action, subject, task_id, data)
        SELECT CAST(:ts AS timestamptz), :actor, :action, :subject, s.task_id::text, :data FROM s
        WHERE CAST(:action AS text) IS NOT NULL
        RETURNING id
    )
    SELECT * FROM s
""", types={
    "id": "uuid", "worker": "text", "inc": "text", "mid": "text", "now": "timestamptz",
    "ts": "timestamptz", "actor": "text", "action": "text", "subject": "text", "data": "text",
})

_RELEASE = text("""
    UPDATE subtasks SET status = 'Pending', error = :error WHERE id = :id AND status = 'Running'
""")


def _outcome(subtask_id: str, row: Any, **extra: Any) -> dict[str, Any]:
    return {
        "subtask_id": subtask_id, "task_id": str(row.task_id), "user_id": str(row.user_id), "model": row.model,
        "device": (row.queue or "cpu.").split(".", 1)[0], "index": row.index, "items": row.items, **extra,
    }


def _still_running(row: Any, *, hostname: str, incarnation: str | None) -> bool:
    """Whether the node process that claimed `row` may still be running it.

    A claim by another process of this very node (same name, another incarnation) was made by a
    predecessor this process replaced: dead, with no registry read (this node's own heartbeat may
    not be written yet when its first messages arrive). Otherwise the registry says: the node's
    heartbeat is current and names the claiming process (`registry.service.claim_alive`)."""
    from marketplace.infra.redis_client import get_redis
    from marketplace.registry.service import claim_alive

    if row.worker == hostname and row.worker_incarnation and incarnation:
        return row.worker_incarnation == incarnation
    try:
        return claim_alive(get_redis(), hostname=row.worker, incarnation=row.worker_incarnation)
    except Exception:  # registry unreachable: assume the other node is gone, like recovery does
        return False


# Seconds past a model's time limit after which a Running subtask is taken as abandoned
# (Celery kills it at its hard limit, the limit + 30 s; scheduling/lost.py); recovery uses the same cutoff.
RUNNING_MARGIN = 60.0


def _outlived(row: Any, now: Any) -> bool:
    """Running past the model's time limit plus a margin (recovery re-sends such subtasks)."""
    from datetime import timedelta

    limit = get_catalog().time_limit(row.model)
    return row.started_at is not None and row.started_at < now - timedelta(seconds=limit + RUNNING_MARGIN)


def claim_subtask(
    subtask_id: str, *, hostname: str, message_id: str | None = None, incarnation: str | None = None
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Mark the subtask Running; returns (final outcome if there is nothing to run, work to do).

    `incarnation`: the claiming node process's id (`registry.signals.incarnation`), written with
    the hostname so that a successor under the same name knows this claim's process from its own.
    """
    from marketplace.audit.service import take_carried

    sid = uuid.UUID(subtask_id)
    now = utcnow()
    carried = take_carried()
    if len(carried) <= 1:  # the common case: one statement, committed by itself
        one = carried[0] if carried else {"ts": None, "actor": None, "action": None, "subject": None, "data": None}
        with autocommit() as conn:
            row = _CLAIM_PENDING.execute(conn, {"id": sid, "worker": hostname, "inc": incarnation, "mid": message_id,
                                                "now": now, **one}).first()
        if row is not None:
            return None, _work(subtask_id, row, row.attempts)
    with get_engine().begin() as conn:
        return _claim_checked(conn, sid, subtask_id, hostname=hostname, incarnation=incarnation,
                              message_id=message_id, now=now, carried=carried)


def _claim_checked(
    conn: Any, sid: uuid.UUID, subtask_id: str, *, hostname: str, incarnation: str | None, message_id: str | None,
    now: Any, carried: list[dict[str, Any]],
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Redelivery, a copy from recovery, a task that ended: decide from the row, in a transaction."""
    from marketplace.audit.service import write_carried

    if len(carried) > 1:  # several carried records: the one-statement claim, then the rest beside it
        row = _CLAIM_PENDING.execute(conn, {"id": sid, "worker": hostname, "inc": incarnation, "mid": message_id,
                                            "now": now, "ts": None, "actor": None, "action": None, "subject": None,
                                            "data": None}).first()
        if row is not None:
            write_carried(conn, task_id=row.task_id, rows=carried)
            return None, _work(subtask_id, row, row.attempts)
    row = conn.execute(_LOAD, {"id": sid}).first()
    write_carried(conn, task_id=row.task_id if row else None, rows=carried)  # task_prerun's `subtask.started`
    if row is None:
        return {"ok": False, "skipped": True, "subtask_id": None, "error": f"unknown subtask {subtask_id}"}, {}
    if row.task_status in ("Done", "Failed", "Cancelled"):
        return _outcome(subtask_id, row, ok=False, skipped=True, error=f"task is {row.task_status}"), {}
    if row.status == "Done":  # a redelivery of finished work: report, never re-run
        return _outcome(subtask_id, row, ok=True, duplicate=True, key=row.result_key, sha256=row.result_sha256,
                        seconds=row.seconds), {}
    if row.status == "Failed":
        return _outcome(subtask_id, row, ok=False, duplicate=True, error=row.error, seconds=row.seconds), {}
    if row.status == "Running" and row.celery_id and row.celery_id != message_id and row.worker:
        # Another message (recovery re-sent the subtask) while a live node still runs the first:
        # let that one finish rather than run the subtask twice at once. The same message coming
        # back is a redelivery after its process died, and runs. So does a copy of one whose node
        # died or restarted under the same name: its claim names a process that is gone (Celery's
        # pool children die with their main process). So does a copy of one that has outlived its
        # hard time limit: nothing runs that any more (its message ended, e.g. with a kill at the
        # limit that left the row Running), however live its node is; but not without end: one
        # that keeps outliving its limit fails with the reason.
        outlived = _outlived(row, now)
        if not outlived and _still_running(row, hostname=hostname, incarnation=incarnation):
            return _outcome(subtask_id, row, ok=False, skipped=True, error=f"running on {row.worker}"), {}
        if outlived and row.attempts > get_settings().subtask_max_retries:
            limit = get_catalog().time_limit(row.model)
            return _outcome(subtask_id, row, ok=False, abandoned=True, error=(
                f"did not finish within its time limit ({limit:g}s) in {row.attempts} attempts; "
                f"the last ran on {row.worker}")), {}
    attempts = conn.execute(_CLAIM, {"id": sid, "worker": hostname, "inc": incarnation, "mid": message_id,
                                     "now": now}).scalar()
    return None, _work(subtask_id, row, attempts)


def _work(subtask_id: str, row: Any, attempts: int) -> dict[str, Any]:
    """What the runner needs from a claimed subtask's row."""
    return {"inputs": row.inputs, "params": row.params or {}, "base": _outcome(subtask_id, row), "attempts": attempts}


def complete_params(subtask_id: str, *, key: str, sha256: str, seconds: float) -> dict[str, Any]:
    return {"id": uuid.UUID(subtask_id), "sid": subtask_id, "key": key, "sha": sha256, "seconds": seconds,
            "now": utcnow(), "topic": topic_for("SubTaskCompleted")}


def complete_subtask(subtask_id: str, *, key: str, sha256: str, seconds: float) -> tuple[bool, int]:
    """Record success and emit SubTaskCompleted in one statement.

    Returns (no other subtask of the task is still Pending or Running: `was_last`, the task's
    subtask count).
    """
    with autocommit() as conn:
        row = conn.execute(_COMPLETE, complete_params(subtask_id, key=key, sha256=sha256, seconds=seconds)).first()
        return (was_last(conn, row), int(row.subtask_count)) if row is not None else (False, 0)


def release_subtask(subtask_id: str, *, error: str) -> None:
    """Back to Pending before a retry, keeping the last error visible."""
    with get_engine().begin() as conn:
        conn.execute(_RELEASE, {"id": uuid.UUID(subtask_id), "error": error})


def fail_subtask(subtask_id: str, *, error: str, seconds: float, index: int) -> list[tuple[str, str]]:
    """Record the failure and fail the task now (siblings then skip); returns after-commit actions."""
    from sqlalchemy import select

    from marketplace.results.service import fail_task
    from marketplace.tasks.models import SubTask, Task

    with session_scope() as session:
        sub = session.get(SubTask, uuid.UUID(subtask_id))
        if sub is None:
            return []
        sub.status, sub.error, sub.seconds, sub.finished_at = "Failed", error, seconds, utcnow()
        task = session.scalar(select(Task).where(Task.id == sub.task_id).with_for_update())
        emit(session, type="SubTaskCompleted", key=str(sub.task_id), payload={
            "task_id": str(sub.task_id), "user_id": str(task.user_id) if task is not None else None,
            "subtask_id": subtask_id, "index": sub.index, "status": "Failed", "items": sub.items,
            "seconds": seconds, "worker": sub.worker, "attempts": sub.attempts, "error": error,
        })
        if task is not None:
            fail_task(session, task=task, error=f"subtask {index} failed: {error}")
        return session.info.pop("after_commit", [])



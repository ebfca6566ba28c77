"""The task's doors: assign (Created -> Scheduled) and its ends (Done, Failed, Cancelled).

Each runs in the caller's session, under the task's row lock (taken first, before any of its
subtasks' rows: the lock order every door keeps), and leaves what must follow the commit to
`infra.after_commit.defer`: the webhook's delivery, revoking the messages of subtasks that will
not run now, and the stop signal for those running.
"""
from __future__ import annotations

import logging
import uuid

from sqlalchemy import func, select
from sqlalchemy.orm import Session

import marketplace.tasks.lifecycle.statements as sql
from marketplace import observability
from marketplace.audit import service as audit
from marketplace.billing import service as billing
from marketplace.events.outbox import emit, topic_for
from marketplace.infra import names
from marketplace.infra.after_commit import defer
from marketplace.infra.db import autocommit, utcnow
from marketplace.tasks.lifecycle.moves import check as check_move
from marketplace.tasks.models import SubTask, SubTaskStatus, Task, TaskStatus

logger = logging.getLogger(__name__)
EVENTS = {TaskStatus.DONE: "TaskCompleted", TaskStatus.FAILED: "TaskFailed", TaskStatus.CANCELLED: "TaskCancelled"}
# A task that ended while subtasks of it ran: its nodes stop them (`workers.runner`). Kept a day,
# longer than any subtask's time limit.
STOP_KEY = "marketplace:stop:{}"
STOP_TTL_S = 24 * 3600


def lock_task(session: Session, task_id: uuid.UUID | str) -> Task | None:
    """The task's row, locked FOR UPDATE, with its current values (not a stale loaded object)."""
    return session.scalar(select(Task).where(Task.id == uuid.UUID(str(task_id))).with_for_update()
                          .execution_options(populate_existing=True))


# -- assign ---------------------------------------------------------------------------------------------

def assign(task_id: str, *, model: str, queues: dict[str, str | None]) -> tuple[str, str | None] | None:
    """Created -> Scheduled on the queue chosen for its device (`queues`: cpu, gpu, any -> a queue
    with live nodes, or None), in one statement with its TaskAssigned event; every subtask goes
    to its backlog. Returns (queue, trace id), or None where the row is not a Created task of
    `model` with a queue (the caller decides from the locked row: `assign_locked`)."""
    with autocommit() as conn:
        row = sql.ASSIGN.execute(conn, {"id": uuid.UUID(task_id), "model": model, **queues, "now": utcnow(),
                                        "topic": topic_for("TaskAssigned")}).first()
    return (row.queue, row.trace_id) if row is not None else None


def assign_locked(session: Session, *, task: Task, queue: str) -> None:
    """`assign` for a task under its row lock (the message's model did not match the row's)."""
    check_move("task", task.status, TaskStatus.SCHEDULED.value)
    now = utcnow()
    task.queue, task.status, task.scheduled_at, task.progress_at = queue, TaskStatus.SCHEDULED.value, now, now
    task.status_reason = None
    task.dispatch_count += 1
    task.backlog = task.subtask_count
    session.flush()
    emit_assigned(session, task_id=task.id)


def emit_assigned(session: Session, *, task_id: uuid.UUID) -> None:
    """The TaskAssigned event of a task given a queue (the same payload `ASSIGN` writes)."""
    session.execute(sql.ASSIGNED_EVENT, {"id": task_id, "now": utcnow(), "topic": topic_for("TaskAssigned")})


# -- the ends -------------------------------------------------------------------------------------------

def finish(session: Session, *, task: Task, status: TaskStatus, error: str | None = None,
           failed: int | None = None, actor: str = "system") -> None:
    """Set a final status, settle billing and emit the event, in the caller's transaction (the
    task's row locked). What has not run is Cancelled; what runs is stopped by its node.

    `failed`: the number of failed subtasks when the caller already knows it. The records go to
    `audit_pending` (chained within seconds): chaining here would take the chain's global lock
    inside every task's last step.
    """
    check_move("task", task.status, status.value)
    with session.no_autoflush:  # the task row is written once, at commit, not once per query below
        _end(session, task=task, status=status, error=error, failed=failed, actor=actor)


def _end(session: Session, *, task: Task, status: TaskStatus, error: str | None, failed: int | None,
         actor: str) -> None:
    now = utcnow()
    task.status, task.error, task.status_reason, task.finished_at = status.value, error, None, now
    # The hold first, FOR UPDATE: a subtask's charge (hold FOR SHARE, then its ledger row) then
    # either committed before or waits for settlement.
    billing.lock_hold(session, task_id=task.id)
    sent = []
    if status != TaskStatus.DONE:
        reason = "its task was cancelled" if status == TaskStatus.CANCELLED else "its task failed"
        sent = session.execute(sql.CANCEL_OPEN, {"task_id": task.id, "now": now, "reason": reason}).all()
        task.backlog = 0
    billing.settle_task(session, task=task, hold_locked=True)
    audit.enqueue(session, actor=actor, action=f"task.{status.value.lower()}", subject=f"task:{task.id}",
                  task_id=task.id, data={"user_id": str(task.user_id), "status": status.value,
                                         "cost": str(task.cost), "error": error})
    observability.task_finished(model=task.model, status=task.status, cost=task.cost)
    if failed is None:
        failed = session.scalar(select(func.count()).select_from(SubTask).where(
            SubTask.task_id == task.id, SubTask.status == SubTaskStatus.FAILED.value))
    emit(session, type=EVENTS[status], key=str(task.id), payload={
        "task_id": str(task.id), "user_id": str(task.user_id), "model": task.model, "status": task.status,
        "cost": str(task.cost), "error": error, "result_key": task.result_key, "items": task.total_items,
        "subtasks": task.subtask_count, "failed_subtasks": failed,
        "seconds": round((task.finished_at - (task.started_at or task.created_at)).total_seconds(), 6),
    })
    if status != TaskStatus.DONE:
        defer(session, signal_stop, str(task.id), [f"{sid}:{n}" for sid, n in sent])
    if task.webhook_url:  # sent after the commit; recovery re-sends it if it is lost on the way
        task.webhook_sent_at = task.finished_at
        defer(session, send_webhook, str(task.id))


def fail_task(session: Session, *, task: Task, error: str) -> None:
    """End a task `Failed` with a reason (a subtask failed, no node came, recovery gave up)."""
    if not TaskStatus(task.status).final:
        finish(session, task=task, status=TaskStatus.FAILED, error=error)


def cancel(session: Session, *, task: Task, actor: str) -> bool:
    """End an active task `Cancelled` (the caller holds its row); False if it already was."""
    if task.status == TaskStatus.CANCELLED.value:
        return False
    audit.enqueue(session, actor=actor, action="task.cancel_requested", subject=f"task:{task.id}", task_id=task.id,
                  data={"backlog": task.backlog})
    finish(session, task=task, status=TaskStatus.CANCELLED, error="cancelled by the user", actor=actor)
    return True


def signal_stop(task_id: str, message_ids: list[str]) -> None:
    """After a task ended: its running subtasks' nodes stop them (they watch STOP_KEY), and the
    messages of those sent but not started are revoked (a claim would skip them anyway)."""
    from marketplace.infra.celery_app import app
    from marketplace.infra.redis_client import get_redis

    try:
        get_redis().set(STOP_KEY.format(task_id), 1, ex=STOP_TTL_S)
    except Exception:  # its nodes then run their subtasks to the end: charged as they were before
        logger.warning("could not signal the stop of task %s's running subtasks", task_id, exc_info=True)
    if message_ids:
        try:
            app.control.revoke(message_ids)
        except Exception:  # noqa: BLE001 - the task is final in the database: a claim skips them
            logger.warning("could not broadcast revoke for %d subtasks", len(message_ids), exc_info=True)


def send_webhook(task_id: str) -> bool:
    """Queue a webhook's delivery. The task's final status is committed: a broker that is down
    now must not fail the step that finished it; recovery re-sends it
    (`scheduling.recovery.resend_lost_webhooks`)."""
    from marketplace.infra.celery_app import app, send_or_leave_to_recovery

    message_id = str(uuid.uuid4())
    return send_or_leave_to_recovery(
        names.DELIVER_WEBHOOK, message_id,
        lambda: app.send_task(names.DELIVER_WEBHOOK, args=[task_id], queue=names.MAINTENANCE_QUEUE,
                              ignore_result=True, task_id=message_id),
        what=f"webhook for task {task_id}")


def stopped(task_id: str) -> bool:
    """Whether the task's nodes are told to stop its subtasks (it ended while they ran)."""
    from marketplace.infra.redis_client import get_redis

    return bool(get_redis().exists(STOP_KEY.format(task_id)))



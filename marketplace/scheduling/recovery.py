"""Periodic jobs (celery beat, queue `marketplace.maintenance`): recovery of stalled tasks."""
from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import false, func, select, text, tuple_

from marketplace.catalog import get_catalog
from marketplace.infra import names
from marketplace.infra.celery_app import app
from marketplace.infra.db import session_scope, utcnow
from marketplace.settings import get_settings
from marketplace.tasks.models import SubTask, SubTaskStatus, Task, TaskStatus

logger = logging.getLogger(__name__)


def redeclare_queues() -> None:
    """Re-create queue bindings: a flushed Redis loses kombu's `_kombu.binding.*` sets,
    and publishes to an exchange without bindings are dropped until someone declares."""
    with app.connection_for_write() as conn:
        for queue in app.amqp.queues.values():
            queue.bind(conn).declare()


def recover_stalled() -> dict[str, list[str]]:
    """Find tasks that stopped moving and push them on from the database.

    - `Created` with no scheduling attempt for a while (the schedule message was lost):
      publish `schedule` again (it is idempotent under the row lock).
    - `Scheduled`/`InProgress` with no subtask progress past the stall deadline: send again
      exactly the subtasks that were sent and are not final — `Pending` ones (their message
      was lost with Redis), and `Running` ones that nothing runs any more (`orphans.lost`: the
      node is gone or restarted, or the run outlived its time limit); a merely slow subtask on
      a live node is left alone — or, when all are final, finish the task. A sent Pending
      subtask whose queue holds other work is waiting its turn, unless the broker was found
      emptied after it was sent (`broker.lost_before`), or its message is held
      unacknowledged since before the deadline by a consumer that never started it (a node
      that died: `broker.held_since`). Subtasks not sent yet wait for the fair dispatcher
      (`scheduling.dispatch`), not for recovery.
    - `Running` subtasks whose node restarted under the same name (its heartbeat names
      another process than the one that claimed them): sent again at once, whatever the
      stall deadline (`scheduling/orphans.py`; the new node's `wake` does it first).
    - Subtasks left open by a task that ended (a claim that raced its cancel, a node that
      died while being stopped): Cancelled (`close_leftovers`).
    - Charges that landed after their task was settled and were never settled themselves
      (the process died between the two commits): settle them now.
    - Webhook deliveries whose message was lost: send them again (`resend_lost_webhooks`).
    - A stalled task whose queue no live node serves: sent with `device: any`, it moves to the
      other device's queue if that has a node; else `status_reason` says so, and it fails with
      that reason after `schedule_timeout` (`scheduling/stranded.py`).
    """
    from marketplace.infra.broker import held_since, lost_before, queue_depths
    from marketplace.infra.redis_client import get_redis
    from marketplace.observability.tracing import job_trace
    from marketplace.registry.service import live_workers
    from marketplace.results.service import finalize_task
    from marketplace.scheduling import orphans, stranded
    from marketplace.scheduling.dispatch import resend
    from marketplace.tasks import lifecycle
    from marketplace.tasks.service import enqueue_schedule

    settings = get_settings()
    workers = live_workers(get_redis())
    live_nodes = [w["hostname"] for w in workers]
    now = utcnow()
    cutoff = now - timedelta(seconds=settings.recovery_stall_seconds)
    report: dict[str, list[str]] = {"rescheduled": [], "taken_over": [], "redispatched": [], "finalized": [],
                                    "settled": [], "stranded": [], "rerouted": [], "failed": []}
    with session_scope() as session:
        created = session.execute(
            select(Task.id, Task.trace_id).where(Task.status == TaskStatus.CREATED.value, Task.progress_at < cutoff)
            .limit(500)
        ).all()
        for task_id, _ in created:
            session.execute(Task.__table__.update().where(Task.id == task_id).values(progress_at=now))
    lost_at = lost_before(now)  # before the queues are declared again
    redeclare_queues()
    for task_id, trace_id in created:
        with job_trace(trace_id, "reschedule"):  # the job's trace, not this sweep's
            enqueue_schedule(task_id)
        report["rescheduled"].append(str(task_id))
    # Before the stalled tasks are read: these are sent now, and so have moved.
    report["taken_over"] = orphans.take_over(workers=workers)

    with session_scope() as session:
        last_move = (
            select(SubTask.task_id, func.max(func.greatest(SubTask.started_at, SubTask.finished_at)).label("moved"))
            .group_by(SubTask.task_id).subquery()
        )
        rows = session.execute(
            select(Task).outerjoin(last_move, last_move.c.task_id == Task.id).where(
                Task.status.in_((TaskStatus.SCHEDULED.value, TaskStatus.IN_PROGRESS.value)),
                Task.progress_at < cutoff,
                func.coalesce(last_move.c.moved, Task.progress_at) < cutoff,
            ).with_for_update(of=Task, skip_locked=True).limit(200)
        ).scalars().all()
        plans: list[tuple[str, list[str], str, str, str | None, bool]] = []
        depths = queue_depths(sorted({t.queue for t in rows if t.queue}))
        held = _held_subtasks(held_since(cutoff)) if rows else set()
        to_finalize: list[str] = []
        for task in rows:
            # No live node serves its queue: say so, and fail it once it has waited too long.
            unserved = stranded.check(session, task, workers=workers, now=now)
            if unserved:
                report[unserved].append(str(task.id))
                if unserved == "failed":
                    continue
            limit = get_catalog().time_limit(task.model)
            # Pending subtasks whose queue still holds messages are waiting their turn behind
            # other work, not lost: re-sending them would only queue duplicates. Unless the
            # broker lost everything since they were sent: the queue holds others' newer work.
            sent_before_loss = lost_at is not None and task.progress_at < lost_at
            # Moved to another queue: every open subtask is sent there, whatever waits in the old one.
            waiting_in_queue = depths.get(task.queue or "", 0) > 0 and not sent_before_loss and unserved != "rerouted"
            pending_lost = (SubTask.status == SubTaskStatus.PENDING.value) & (SubTask.dispatches > 0)
            if waiting_in_queue:
                pending_lost = pending_lost & tuple_(SubTask.id, SubTask.dispatches).in_(list(held)) if held else false()
            missing = [str(i) for i in session.scalars(
                select(SubTask.id).where(
                    SubTask.task_id == task.id, pending_lost | orphans.lost(workers, now=now, time_limit=limit),
                ).order_by(SubTask.index)
            )]
            unfinished = session.scalar(select(func.count()).select_from(SubTask).where(
                SubTask.task_id == task.id, SubTask.status.in_((SubTaskStatus.PENDING.value, SubTaskStatus.RUNNING.value))
            ))
            task.progress_at = now
            rerouted = unserved == "rerouted"
            if missing:  # its dispatch count moves with the re-send (`lifecycle.resend`)
                plans.append((str(task.id), missing, task.queue or "", task.model, task.trace_id, not rerouted))
            elif not unfinished:
                to_finalize.append(str(task.id))
            if rerouted:  # event consumers follow the task to its new queue: a dispatch of its own
                task.dispatch_count += 1
                session.flush()
                lifecycle.emit_assigned(session, task_id=task.id)
        stranded.clear_served(session, workers=workers)
    for task_id, ids, queue, model, trace_id, count in plans:
        logger.warning("recovery: sending %d subtask(s) of task %s again", len(ids), task_id)
        resend(task_id, ids, queue=queue, model=model, trace_id=trace_id, count=count)
        report["redispatched"].append(task_id)
    for task_id in to_finalize:
        finalize_task(task_id)
        report["finalized"].append(task_id)
    report["closed"] = close_leftovers(live_nodes=live_nodes, cutoff=cutoff)
    report["settled"] = settle_stray_charges(recorded_before=cutoff)
    report["webhooks"] = resend_lost_webhooks(now)
    return report


def not_yet_stalled_on_dead_nodes() -> list[str]:
    """Active tasks with a subtask `Running` on a node that has no heartbeat, which the sweep
    leaves alone until they have not moved for the stall deadline: what an operator who just
    lost a node sees waiting (`marketplace recover` says so, and how to act at once)."""
    from marketplace.infra.redis_client import get_redis
    from marketplace.registry.service import live_workers

    live = [w["hostname"] for w in live_workers(get_redis())]
    with session_scope() as session:
        return [str(t) for t in session.scalars(
            select(SubTask.task_id).join(Task, Task.id == SubTask.task_id).where(
                Task.status.in_((TaskStatus.SCHEDULED.value, TaskStatus.IN_PROGRESS.value)),
                SubTask.status == SubTaskStatus.RUNNING.value, SubTask.worker.not_in(live or [""]),
            ).distinct().limit(100)
        )]


def resend_lost_webhooks(now: datetime) -> list[str]:
    """Re-send the deliveries of final tasks whose webhook message was lost (the broker was down
    when it was sent, or flushed while it waited): sent, never ended, past `webhooks.stall_seconds`.
    Receivers may see a delivery twice (the same `X-Marketplace-Delivery`), never none."""
    from marketplace.tasks.lifecycle import send_webhook
    from marketplace.webhooks.delivery import stall_seconds

    cutoff = now - timedelta(seconds=stall_seconds())
    with session_scope() as session:
        lost = session.scalars(
            select(Task).where(Task.webhook_sent_at < cutoff, Task.webhook_done_at.is_(None),
                               Task.webhook_url.is_not(None))
            .with_for_update(skip_locked=True).limit(200)
        ).all()
        for task in lost:
            task.webhook_sent_at = now
        ids = [str(task.id) for task in lost]
    for task_id in ids:
        logger.warning("recovery: re-sending the webhook of task %s", task_id)
        send_webhook(task_id)
    return ids


# A task that ended leaves no subtask open: Pending ones at once, Running ones once their node is
# gone (it stops them while it lives) or past the stall deadline. Nothing is charged for these:
# what ran was charged when its run was stopped, if its node lived to record it.
_CLOSE = text(f"""
    UPDATE subtasks SET status = '{SubTaskStatus.CANCELLED.value}', finished_at = :now,
           error = COALESCE(error, 'its task ended')
    WHERE id IN (
        SELECT s.id FROM subtasks s JOIN tasks t ON t.id = s.task_id
        WHERE t.status IN ('{TaskStatus.DONE.value}', '{TaskStatus.FAILED.value}', '{TaskStatus.CANCELLED.value}')
          AND t.finished_at < :cutoff
          AND (s.status = '{SubTaskStatus.PENDING.value}'
               OR (s.status = '{SubTaskStatus.RUNNING.value}'
                   AND (s.worker <> ALL(CAST(:live AS text[])) OR s.started_at < :cutoff)))
        LIMIT 1000 FOR UPDATE OF s SKIP LOCKED
    )
    RETURNING task_id
""")


def close_leftovers(*, live_nodes: list[str], cutoff: datetime) -> list[str]:
    """Cancel the subtasks that tasks ended before the stall deadline left open; their task ids."""
    with session_scope() as session:
        rows = session.execute(_CLOSE, {"now": utcnow(), "cutoff": cutoff, "live": live_nodes}).all()
    return sorted({str(r.task_id) for r in rows})


def _held_subtasks(message_ids: set[str]) -> set[tuple[uuid.UUID, int]]:
    """(subtask, dispatch) of the subtask messages among `message_ids` (`<subtask id>:<dispatch>`).
    Only a subtask's latest send counts: once re-sent, it waits for the new copy, and kombu
    returns the old one after its visibility timeout."""
    found = set()
    for mid in message_ids:
        subtask_id, _, dispatch = mid.rpartition(":")
        try:
            found.add((uuid.UUID(subtask_id), int(dispatch)))
        except ValueError:
            continue  # another task's message
    return found


def settle_stray_charges(*, recorded_before: datetime) -> list[str]:
    """Settle late charges whose own settlement was lost; returns their task ids."""
    from marketplace.billing import service as billing

    with session_scope() as session:
        stray = billing.tasks_with_stray_charges(session, recorded_before=recorded_before)
    for task_id in stray:
        logger.warning("recovery: settling stray late charges of task %s", task_id)
        with session_scope() as session:
            billing.settle_late(session, task_id=task_id)
    return [str(t) for t in stray]


@app.task(name=names.RECOVER, acks_late=True)
def recover() -> dict[str, Any]:
    report = recover_stalled()
    if any(report.values()):
        logger.warning("recovery: %s", {k: len(v) for k, v in report.items()})
    return report

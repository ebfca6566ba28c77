"""Subtasks left `Running` by a node process that is gone.

A claim records the node's name and the incarnation of its process (`registry.signals`); the
registry's live records say which incarnation each node runs now. Two ways a claim outlives its
process:

- The node restarted under the same name (a standalone's worker, a container restarted in place):
  it heartbeats its new incarnation at once, so its predecessor's rows are dead for certain
  (Celery's pool children die with their main process). `take_over` puts them back to `Pending`
  and sends them again now: on the new node's `wake`, and at every recovery sweep, not after the
  stall deadline. Before, the hostname alone made them look live: their copies were skipped as
  "running on" the new node, and the job waited for the subtask's time limit.
- The node has no heartbeat at all: it may be only cut off from Redis for a moment, so recovery
  re-sends its rows once the task has not moved for the stall deadline, and a copy runs only if
  the node is still gone when it is claimed (`tasks.lifecycle.claim`).
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, select, tuple_

from marketplace.infra.db import session_scope
from marketplace.tasks.lifecycle import RUNNING_MARGIN
from marketplace.tasks.models import SubTask, SubTaskStatus, Task, TaskStatus

logger = logging.getLogger(__name__)
ACTIVE = (TaskStatus.SCHEDULED.value, TaskStatus.IN_PROGRESS.value)
TAKE_OVER_BATCH = 500  # tasks per pass; the next sweep takes the rest


def live_claims(workers: list[dict[str, Any]]) -> dict[str, str | None]:
    """Live node -> the incarnation it runs now (None: a node that heartbeats none)."""
    from marketplace.registry.service import incarnation_of

    return {w["hostname"]: incarnation_of(w) for w in workers if w.get("hostname")}


def superseded(workers: list[dict[str, Any]], *, hostname: str | None = None) -> ColumnElement[bool] | None:
    """Rows claimed by a process of a live node (`hostname` only, when given) that now runs another
    incarnation; None when no such node is live."""
    pairs = [(h, inc) for h, inc in live_claims(workers).items() if inc and hostname in (None, h)]
    if not pairs:
        return None
    return (SubTask.worker.in_([h for h, _ in pairs]) & SubTask.worker_incarnation.is_not(None)
            & tuple_(SubTask.worker, SubTask.worker_incarnation).not_in(pairs))


def lost(workers: list[dict[str, Any]], *, now: datetime, time_limit: float) -> ColumnElement[bool]:
    """`Running` rows that nothing runs any more, as a re-sent copy's claim judges them: their node
    has no heartbeat or runs another incarnation, or the run outlived its time limit + margin."""
    gone = SubTask.worker.not_in(list(live_claims(workers)) or [""])
    replaced = superseded(workers)
    if replaced is not None:
        gone = gone | replaced
    outlived = SubTask.started_at < now - timedelta(seconds=time_limit + RUNNING_MARGIN)
    return (SubTask.status == SubTaskStatus.RUNNING.value) & (gone | outlived)


def take_over(*, hostname: str | None = None, workers: list[dict[str, Any]] | None = None) -> list[str]:
    """Send again, now, the subtasks of active tasks whose node (`hostname`, or any) restarted
    while they ran; returns the ids of their tasks."""
    from marketplace.infra.redis_client import get_redis
    from marketplace.registry.service import live_workers

    replaced = superseded(live_workers(get_redis()) if workers is None else workers, hostname=hostname)
    if replaced is None:
        return []
    with session_scope() as session:
        task_ids = session.scalars(
            select(SubTask.task_id).join(Task, Task.id == SubTask.task_id)
            .where(Task.status.in_(ACTIVE), SubTask.status == SubTaskStatus.RUNNING.value, replaced)
            .distinct().limit(TAKE_OVER_BATCH)
        ).all()
    return [task_id for task_id in map(str, task_ids) if _release_and_send(task_id, replaced)]


def _release_and_send(task_id: str, replaced: ColumnElement[bool]) -> bool:
    """Under the task's lock, its superseded rows; then each back to `Pending` (`lifecycle.retry`:
    its process is gone) and sent again as a new message."""
    from marketplace.scheduling.dispatch import resend
    from marketplace.tasks import lifecycle

    with session_scope() as session:
        # The task's row first, as every task-level door takes it before its subtasks' rows.
        task = lifecycle.lock_task(session, task_id)
        if task is None or task.status not in ACTIVE:
            return False
        rows = session.execute(
            select(SubTask.id, SubTask.worker).where(SubTask.task_id == task.id,
                                                     SubTask.status == SubTaskStatus.RUNNING.value, replaced)
            .order_by(SubTask.index)
        ).all()
        if not rows:
            return False
        queue, model, trace_id = task.queue or "", task.model, task.trace_id
    for sid, worker in rows:
        lifecycle.retry(str(sid), error=f"node {worker} restarted while it ran; sent again")
    logger.warning("task %s: %d subtask(s) ran on a node that restarted since; sending them again", task_id,
                   len(rows))
    resend(task_id, [str(sid) for sid, _ in rows], queue=queue, model=model, trace_id=trace_id)
    return True

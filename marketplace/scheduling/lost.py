"""A subtask's run that ended without an outcome: killed at its hard time limit.

`workers.run_subtask` never raises, and a SIGKILLed pool child's message is redelivered, so the
one way a subtask message ends `FAILURE` is Celery's hard time limit: the pool kills a child
that ignored its soft limit (a hung C call, a stopped process) and fails the message. Its row
stays `Running` under the dead run, and the chord it was in can no longer call finalize. Each
subtask message carries an errback to `lost_run`, and each chord callback one to finalize, so
the task moves on at once instead of after recovery's cutoff (the limit plus a minute):

- `lost_run` retries the subtask in a chord of its own, or fails it once its attempts are spent;
- the broken chord's errback still calls finalize once all its messages have ended, so the
  last of the two chords to end finishes the task.
"""
from __future__ import annotations

import logging
import uuid

from sqlalchemy import select

from marketplace.catalog import get_catalog
from marketplace.infra.db import session_scope
from marketplace.settings import get_settings
from marketplace.tasks.models import SubTask, SubTaskStatus, Task, TaskStatus

logger = logging.getLogger(__name__)

# How long past its soft limit a subtask that ignores it is killed (less for limits under this).
HARD_LIMIT_GRACE = 30.0


def hard_time_limit(soft: float) -> float:
    return soft + min(HARD_LIMIT_GRACE, soft)


def lost_run(celery_id: str) -> str:
    """Retry or fail the subtask whose run (message id `<subtask id>:<attempt>`) was killed."""
    from marketplace.results.service import run_after_commit
    from marketplace.scheduling.service import dispatch_until_sent
    from marketplace.tasks import progress

    subtask_id = celery_id.rpartition(":")[0]
    sid = uuid.UUID(subtask_id)
    with session_scope() as session:
        # The task's row first, as finalize takes it before its ledger rows reference the subtasks.
        # No key update: the rows' foreign-key share locks (ledger inserts) need not wait on this.
        task = session.scalar(select(Task).where(Task.id == select(SubTask.task_id).where(SubTask.id == sid)
                                                 .scalar_subquery()).with_for_update(key_share=True))
        sub = session.scalar(select(SubTask).where(SubTask.id == sid).with_for_update(key_share=True))
        if task is None or sub is None or sub.status != SubTaskStatus.RUNNING.value or sub.celery_id != celery_id:
            return "moved on"  # it finished after all, or another run has it
        limit = get_catalog().time_limit(task.model)
        error = f"killed at its hard time limit ({hard_time_limit(limit):g}s) on {sub.worker}"
        if TaskStatus(task.status).final or sub.attempts > get_settings().subtask_max_retries:
            index, task_id = sub.index, str(task.id)
            retry = None
        else:
            sub.status, sub.error = SubTaskStatus.PENDING.value, error
            task.dispatch_count += 1
            retry = (str(task.id), str(task.queue), task.priority, task.dispatch_count, task.trace_id)
    if retry is None:
        logger.warning("subtask %s %s; attempts spent: failing it", subtask_id, error)
        run_after_commit(progress.fail_subtask(subtask_id, error=error, seconds=hard_time_limit(limit), index=index))
        return f"failed {task_id}"
    task_id, queue, priority, attempt, trace_id = retry
    logger.warning("subtask %s %s; retrying it now", subtask_id, error)
    dispatch_until_sent(task_id, [subtask_id], queue=queue, priority=priority, time_limit=limit, attempt=attempt,
                        trace_id=trace_id)
    return f"retried {task_id}"

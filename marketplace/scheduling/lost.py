"""A subtask's run that ended without an outcome: killed at its hard time limit.

`workers.run_subtask` never raises, and a SIGKILLed pool child's message is redelivered, so the
one way a subtask message ends `FAILURE` is Celery's hard time limit: the pool kills a child
that ignored its soft limit (a hung C call, a stopped process) and fails the message. Its row
stays `Running` under the dead run. Each subtask message carries an errback to `lost_run`, so
the subtask moves on at once instead of after recovery's cutoff (the limit plus a minute): it is
sent again as a new message, or failed once its attempts are spent (its task then fails, or, if
the task already ended, it is stopped).
"""
from __future__ import annotations

import logging
import uuid

from sqlalchemy import select

from marketplace.catalog import get_catalog
from marketplace.infra.db import session_scope
from marketplace.scheduling.dispatch import hard_time_limit, resend
from marketplace.settings import get_settings
from marketplace.tasks.models import SubTask, SubTaskStatus, Task, TaskStatus

logger = logging.getLogger(__name__)


def lost_run(celery_id: str) -> str:
    """Retry or fail the subtask whose run (message id `<subtask id>:<dispatch>`) was killed."""
    from marketplace.tasks import lifecycle

    subtask_id = celery_id.rpartition(":")[0]
    sid = uuid.UUID(subtask_id)
    with session_scope() as session:
        # The task's row first, as every task-level door takes it before its subtasks' rows.
        task = session.scalar(select(Task).where(Task.id == select(SubTask.task_id).where(SubTask.id == sid)
                                                 .scalar_subquery()).with_for_update())
        sub = session.scalar(select(SubTask).where(SubTask.id == sid).with_for_update())
        if task is None or sub is None or sub.status != SubTaskStatus.RUNNING.value or sub.celery_id != celery_id:
            return "moved on"  # it finished after all, or another run has it
        limit = get_catalog().time_limit(task.model)
        error = f"killed at its hard time limit ({hard_time_limit(limit):g}s) on {sub.worker}"
        work = lifecycle.Work(subtask_id=subtask_id, task_id=str(task.id), user_id=str(task.user_id),
                              model=task.model, device=(task.queue or "cpu.").split(".", 1)[0],
                              queue=task.queue or "", index=sub.index, items=sub.items, inputs=[], params={},
                              attempts=sub.attempts)
        give_up = TaskStatus(task.status).final or sub.attempts > get_settings().subtask_max_retries
        queue, model, trace_id = task.queue, task.model, task.trace_id
    if give_up:
        logger.warning("subtask %s %s; attempts spent: failing it", subtask_id, error)
        if TaskStatus(task.status).final:
            lifecycle.stop(work, node=sub.worker or "unknown", seconds=hard_time_limit(limit), reason=error)
        else:
            lifecycle.fail(work, node=sub.worker or "unknown", error=error, seconds=hard_time_limit(limit))
        return f"failed {task.id}"
    logger.warning("subtask %s %s; retrying it now", subtask_id, error)
    lifecycle.retry(subtask_id, error=error)
    resend(str(task.id), [subtask_id], queue=queue or "", model=model, trace_id=trace_id)
    return f"retried {task.id}"

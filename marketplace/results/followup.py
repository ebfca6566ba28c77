"""What follows a subtask's recorded outcome, wherever it was recorded: on an operator's node
(`workers.runner`) or by the platform for a credentialed node (`marketplace.providers.work`).

- a charge that landed after its task was settled is settled;
- the fair dispatcher is asked for more work when the queue's broker list runs short;
- the task's last subtask finishes the task: inline for a small task, by a
  `marketplace.results.finalize` message for a big one (a long join).
"""
from __future__ import annotations

import logging
from typing import Any

from marketplace.infra import names

logger = logging.getLogger(__name__)

# A small task's last subtask finishes the task itself, a broker round trip sooner (about a third
# of a one-item job's latency). A big job's last subtask (a long join) sends finalize instead.
INLINE_FINALIZE_MAX_SUBTASKS = 16
INLINE_FINALIZE_SPAN = "inline/marketplace.results.finalize"


def after_outcome(*, task_id: str, subtask_id: str, queue: str, recorded: Any) -> None:
    """Neither step may fail the subtask: its outcome is committed (recovery and beat cover both)."""
    if recorded.late_charge:
        try:
            from marketplace.billing.service import settle_late_now

            settle_late_now(task_id)
        except Exception:
            logger.exception("billing: could not settle the late charge of %s", subtask_id)
    release_more(recorded.queue or queue)


def after_drop(recorded: Any) -> None:
    """A spot check dropped at its claim (`lifecycle.drop_check`): the last open run of its task
    finishes the task; otherwise its slot is free for more work."""
    if recorded.last:
        finish(recorded.task_id, subtasks=recorded.subtasks)
    else:
        release_more(recorded.queue)


def release_more(queue: str) -> None:
    """Ask the fair dispatcher for more work on `queue` if its broker list runs short: after an
    outcome, and after a spot check dropped at its claim (its slot is free, and the task's last
    batches may still wait in its backlog: beat's release would send them only seconds later)."""
    try:
        from marketplace.scheduling.dispatch import release_if_low

        release_if_low(queue)
    except Exception:
        logger.warning("could not release more work on %s", queue, exc_info=True)


def finish(task_id: str, *, subtasks: int) -> bool:
    """The task's last subtask ended: finish the task (True when this call finished it)."""
    if subtasks > INLINE_FINALIZE_MAX_SUBTASKS:
        request_finalize(task_id)
        return False
    from opentelemetry import trace

    from marketplace.results.service import finalize_task

    try:
        # Its own span in the job's trace, where a finalize message's run would have been.
        with trace.get_tracer(__name__).start_as_current_span(INLINE_FINALIZE_SPAN):
            if finalize_task(task_id) not in ("done", "failed"):
                return False
    except Exception:  # the finalize message (and its retries) finishes the task instead
        logger.warning("inline finalize of task %s failed; sending it", task_id, exc_info=True)
        request_finalize(task_id)
        return False
    from marketplace.audit.signals import request_chaining

    try:
        request_chaining()
    except Exception:  # the beat's periodic chaining picks the records up
        logger.warning("could not ask for the audit chaining after task %s", task_id, exc_info=True)
    return True


def request_finalize(task_id: str) -> None:
    from marketplace.infra.celery_app import app

    try:
        app.send_task(names.FINALIZE, args=[task_id], queue=names.RESULTS_QUEUE, task_id=f"{task_id}:finalize:last")
    except Exception:  # recovery finishes the task instead
        logger.warning("could not ask for the finalize of task %s", task_id, exc_info=True)

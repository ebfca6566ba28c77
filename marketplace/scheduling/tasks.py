"""Celery entry point of the scheduler (queue `marketplace.scheduler`)."""
from __future__ import annotations

import logging

from marketplace.celery_app import app
from marketplace.scheduling import service
from marketplace.settings import get_settings

logger = logging.getLogger(__name__)


@app.task(name="marketplace.scheduling.schedule", bind=True, max_retries=None, acks_late=True)
def schedule(self, task_id: str) -> dict:  # type: ignore[no-untyped-def]
    outcome = service.schedule_task(task_id)
    if outcome.status == "waiting":
        # Back off up to 10 s; a new node is noticed within one delay.
        delay = min(10.0, get_settings().schedule_retry_delay * (2 ** min(self.request.retries, 4)))
        raise self.retry(countdown=delay)
    logger.info("schedule %s: %s %s", task_id, outcome.status, outcome.queue or outcome.reason or "")
    return {"status": outcome.status, "queue": outcome.queue, "subtasks": len(outcome.subtask_ids)}

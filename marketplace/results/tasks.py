"""Chord callback (queue `marketplace.results`)."""
from __future__ import annotations

import logging

from sqlalchemy.exc import OperationalError

from marketplace.celery_app import app
from marketplace.results import service
from marketplace.storage import StorageError

logger = logging.getLogger(__name__)


# A down store or database delays the finish; ~30 min of capped backoff, then recovery takes over.
@app.task(
    name="marketplace.results.finalize", bind=True, acks_late=True,
    autoretry_for=(StorageError, OperationalError), retry_backoff=0.5, retry_backoff_max=30,
    retry_jitter=False, max_retries=60,
)
def finalize(self, task_id: str) -> str:  # type: ignore[no-untyped-def]
    outcome = service.finalize_task(task_id)
    logger.info("finalize %s: %s", task_id, outcome)
    return outcome

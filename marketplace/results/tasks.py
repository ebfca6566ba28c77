"""Chord callback (queue `marketplace.results`)."""
from __future__ import annotations

import logging

from marketplace.celery_app import app
from marketplace.results import service
from marketplace.storage import StorageError

logger = logging.getLogger(__name__)


@app.task(
    name="marketplace.results.finalize", bind=True, acks_late=True,
    autoretry_for=(StorageError,), retry_backoff=True, retry_backoff_max=60, max_retries=20,
)
def finalize(self, task_id: str) -> str:  # type: ignore[no-untyped-def]
    outcome = service.finalize_task(task_id)
    logger.info("finalize %s: %s", task_id, outcome)
    return outcome

"""Chord callback (queue `marketplace.results`)."""
from __future__ import annotations

import logging

from sqlalchemy.exc import DBAPIError

from marketplace.infra import names
from marketplace.infra.celery_app import app
from marketplace.infra.errors import Unavailable, database_unavailable
from marketplace.infra.storage import StorageError
from marketplace.results import service

logger = logging.getLogger(__name__)


# A down store or database delays the finish; ~30 min of capped backoff, then recovery takes over.
@app.task(
    name=names.FINALIZE, bind=True, acks_late=True,
    autoretry_for=(StorageError, Unavailable), retry_backoff=0.5, retry_backoff_max=30,
    retry_jitter=False, max_retries=60,
)
def finalize(self, task_id: str) -> str:  # type: ignore[no-untyped-def]
    try:
        outcome = service.finalize_task(task_id)
    except DBAPIError as exc:
        if database_unavailable(exc):
            raise Unavailable(f"database unavailable: {exc.orig}") from exc
        raise
    logger.info("finalize %s: %s", task_id, outcome)
    return outcome

"""Periodic chaining of buffered audit records (beat, queue `marketplace.maintenance`)."""
from __future__ import annotations

import logging

from marketplace.audit import service
from marketplace.celery_app import app

logger = logging.getLogger(__name__)


@app.task(name="marketplace.audit.chain_pending", acks_late=True, ignore_result=True)
def chain_pending() -> int:
    moved = service.chain_pending()
    if moved:
        logger.info("audit: chained %s buffered records", moved)
    return moved

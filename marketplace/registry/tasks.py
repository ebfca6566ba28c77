"""Celery entry point of the worker registry (beat job on `marketplace.maintenance`)."""
from __future__ import annotations

import logging

from marketplace.infra import names
from marketplace.infra.celery_app import app
from marketplace.infra.db import session_scope
from marketplace.registry import service

logger = logging.getLogger(__name__)


@app.task(name=names.SWEEP_WORKERS, queue=names.MAINTENANCE_QUEUE, ignore_result=True)
def sweep() -> dict[str, list[str]]:
    """Mark nodes whose heartbeat key expired offline; refresh the others' last_heartbeat."""
    from marketplace.infra.redis_client import get_redis

    with session_scope() as session:
        return service.sweep(session, r=get_redis())

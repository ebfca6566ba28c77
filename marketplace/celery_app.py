"""The one Celery app, configured lazily from `celeryconfig.py`."""
from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import worker_process_init

logger = logging.getLogger(__name__)

# Task modules are listed by name: `marketplace` never imports `workers` directly.
TASK_MODULES = [
    "marketplace.scheduling.tasks",
    "marketplace.results.tasks",
    "marketplace.maintenance",
    "marketplace.webhooks",
    "workers.tasks",
    # Signal handlers: importing them connects them in every worker.
    "marketplace.billing.signals",
    "marketplace.registry.signals",
    "marketplace.audit.signals",
    "marketplace.audit.tasks",
    "marketplace.registry.tasks",
    "marketplace.events.tasks",
]

app = Celery("marketplace", include=TASK_MODULES)
app.config_from_object("celeryconfig")
# Logging, the node metrics exporter, tracing and our ids: connected wherever the app loads (beat too).
import marketplace.observability.celery  # noqa: E402,F401


@worker_process_init.connect
def _rebuild_clients(**_: Any) -> None:
    """Pools and clients do not survive fork(): every pool child builds its own."""
    from marketplace import db, observability, redis_client, storage

    observability.init_worker_process()  # tracing first, so the new engine is instrumented
    # No pre-ping: it is a round trip per checkout, three per subtask. A connection that died
    # with the server raises OperationalError, which invalidates the pool and retries the task.
    db.init_engine(pool_pre_ping=False)
    storage.reset_store()
    redis_client.reset_redis()

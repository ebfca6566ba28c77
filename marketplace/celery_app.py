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
    "workers.tasks",
    # Signal handlers: importing them connects them in every worker.
    "marketplace.billing.signals",
    "marketplace.registry.signals",
]

app = Celery("marketplace", include=TASK_MODULES)
app.config_from_object("celeryconfig")


@worker_process_init.connect
def _rebuild_clients(**_: Any) -> None:
    """Pools and clients do not survive fork(): every pool child builds its own."""
    from marketplace import db, storage

    from marketplace import redis_client

    db.init_engine()
    storage.reset_store()
    redis_client.reset_redis()

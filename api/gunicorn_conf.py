"""gunicorn hooks: every worker process builds its own DB engine and clients after fork."""
from __future__ import annotations

from typing import Any

from marketplace.observability.logs import dict_config

# gunicorn's error and access logs go through the root logger: JSON lines on stdout.
logconfig_dict = dict_config()


def post_fork(server: Any, worker: Any) -> None:
    from marketplace.infra import db, redis_client, storage

    db.init_engine()
    storage.reset_store()
    redis_client.reset_redis()


def child_exit(server: Any, worker: Any) -> None:
    """Multiprocess metrics: forget a dead worker's live gauges (its counters stay in the totals)."""
    from marketplace.observability.metrics import mark_process_dead

    mark_process_dead(worker.pid)

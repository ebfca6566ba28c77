"""gunicorn hooks: every worker process builds its own DB engine and clients after fork."""
from __future__ import annotations

from typing import Any


def post_fork(server: Any, worker: Any) -> None:
    from marketplace import db, redis_client, storage

    db.init_engine()
    storage.reset_store()
    redis_client.reset_redis()

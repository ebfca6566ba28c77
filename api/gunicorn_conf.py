"""gunicorn hooks: every worker process builds its own DB engine and clients after fork."""
from __future__ import annotations

from typing import Any

from marketplace.observability.logs import dict_config

# gunicorn's error and access logs go through the root logger: JSON lines on stdout.
logconfig_dict = dict_config()


def post_fork(server: Any, worker: Any) -> None:
    from marketplace.events import feed
    from marketplace.infra import db, redis_client, storage

    db.init_engine()
    storage.reset_store()
    redis_client.reset_redis()
    feed.reset_feed()


def post_worker_init(worker: Any) -> None:
    """A stopping worker ends its open event streams first: gunicorn waits for open requests up to
    its graceful timeout, and a stream would hold it that long (clients resume from Last-Event-ID)."""
    import signal

    from marketplace.events import feed

    graceful = signal.getsignal(signal.SIGTERM)

    def stop(sig: int, frame: Any) -> None:
        feed.get_feed().close_all()
        if callable(graceful):
            graceful(sig, frame)

    signal.signal(signal.SIGTERM, stop)


def child_exit(server: Any, worker: Any) -> None:
    """Multiprocess metrics: forget a dead worker's live gauges (its counters stay in the totals)."""
    from marketplace.observability.metrics import mark_process_dead

    mark_process_dead(worker.pid)

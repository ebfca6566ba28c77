"""Re-point this process's clients after the environment changed."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


def reset_clients() -> None:
    from marketplace.infra import db, redis_client, storage
    from marketplace.infra.celery_app import app
    from marketplace.settings import get_settings, reset_settings

    reset_settings()
    db.dispose_engine()
    storage.reset_store()
    redis_client.reset_redis()
    # The Celery app read its config at first use; point it at the current broker.
    s = get_settings()
    app.conf.broker_url = s.celery_broker_url
    app.conf.result_backend = s.celery_result_backend
    app._backend_cache = None  # the result backend is cached per app (or per thread)
    app._local.__dict__.pop("backend", None)
    # Pools are bound to the broker they were made for: drop them (not closed: kombu's
    # global pool registry would hand a closed one back).
    app._pool = None
    app.amqp._producer_pool = None


@contextmanager
def switched_env(**variables: str) -> Iterator[None]:
    """Point this process at other servers (e.g. a private broker) for a while, then back."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    reset_clients()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        reset_clients()


@contextmanager
def private_broker() -> Iterator[object]:
    """A fresh redis-server that this process and every worker it starts use as broker and state store."""
    from tests.support.servers import RedisServer

    server = RedisServer()
    try:
        with switched_env(MARKETPLACE_REDIS_URL=server.url):
            yield server
    finally:
        server.stop()


@contextmanager
def private_database() -> Iterator[object]:
    """A fresh, migrated database that this process and every worker it starts use: tasks that
    other tests left active (their queues, their users' shares) are not in it."""
    from marketplace.infra import migrate
    from tests.support.servers import Postgres

    pg = Postgres()
    try:
        migrate.upgrade(pg.url)
        with switched_env(MARKETPLACE_DATABASE_URL=pg.url):
            yield pg
    finally:
        from marketplace.infra.db import dispose_engine

        dispose_engine()
        pg.drop()

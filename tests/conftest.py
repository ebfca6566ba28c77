"""Shared fixtures: real PostgreSQL, Redis, S3 (moto server) and Celery workers.

Nothing starts unless a test asks for it, so pure unit tests stay fast.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from marketplace.catalog import CONTROL_QUEUES
from tests.support.servers import CeleryWorker, Postgres, RedisServer, S3Server

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    pg = Postgres()
    from marketplace.infra import migrate

    migrate.upgrade(pg.url)
    yield pg
    from marketplace.infra.db import dispose_engine

    dispose_engine()
    pg.drop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    yield server
    server.stop()


def _sandbox() -> str | None:
    for name, binary in (("bwrap", "bwrap"), ("gvisor", "runsc")):
        if shutil.which(binary):
            return name
    return None


@pytest.fixture(scope="session")
def stack(postgres: Postgres, redis_server: RedisServer, s3_server: S3Server) -> Iterator[dict[str, str]]:
    """Point this process (and every child it starts) at the test servers."""
    env = {
        "MARKETPLACE_ENV": "test",
        "MARKETPLACE_DATABASE_URL": postgres.url,
        "MARKETPLACE_REDIS_URL": redis_server.url,
        "MARKETPLACE_S3_ENDPOINT_URL": s3_server.url,
        "MARKETPLACE_S3_BUCKET": "marketplace-test",
        "MARKETPLACE_SUBTASK_RETRY_BACKOFF": "0.2",
        "MARKETPLACE_SCHEDULE_RETRY_DELAY": "0.2",
        "MARKETPLACE_HEARTBEAT_INTERVAL": "1",
        "MARKETPLACE_HEARTBEAT_TTL": "4",
        "MARKETPLACE_RATE_LIMIT": "100000/minute",
        "MARKETPLACE_ANONYMOUS_RATE_LIMIT": "100000/minute",
        # Every test signs up its users from 127.0.0.1; the limits' own tests set low ones.
        "MARKETPLACE_SIGNUP_RATE_LIMIT": "100000/minute",
        "MARKETPLACE_LOGIN_FAILURE_RATE_LIMIT": "100000/minute",
        "MARKETPLACE_LOG_JSON": "false",
        # Webhook tests deliver to receivers on 127.0.0.1, as any user; tests/security/test_security_webhooks.py
        # sets it to `none` and `admins` to check the refusals.
        "MARKETPLACE_WEBHOOK_ALLOW_PRIVATE": "all",
        # Spot checks add a random extra run to ~2% of a redundancy-1 job's subtasks: tests count runs,
        # so they are off unless a test turns them on (tests/marketplace/results/test_verified_results.py).
        "MARKETPLACE_SPOT_CHECK_RATE": "0",
    }
    sandbox = _sandbox()
    if sandbox:
        env["MARKETPLACE_SANDBOX"] = sandbox
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    _reset_clients()
    _push_default_weights()
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _reset_clients()


def _push_default_weights() -> None:
    """A submit of a model whose weights are pushed (resnet50) needs its default version there:
    a stand-in, for the many tests whose tasks never load it (those that do push their own)."""
    import tempfile

    from marketplace.catalog import get_catalog
    from marketplace.infra.storage import get_store
    from marketplace.registry.weights import push_weights

    with tempfile.NamedTemporaryFile(suffix=".pt") as fh:
        fh.write(b"stand-in weights: no test loads the default version")
        fh.flush()
        for spec in get_catalog().models.values():
            if "version" in spec.params:
                push_weights(get_store(), name=spec.name, path=fh.name, version=str(spec.params["version"]))


def _reset_clients() -> None:
    from tests.support.env import reset_clients

    reset_clients()


@pytest.fixture(scope="session")
def redis_client(stack: dict[str, str]):  # type: ignore[no-untyped-def]
    from marketplace.infra.redis_client import get_redis

    return get_redis()


ALL_COMPUTE_QUEUES = ["cpu.generic", "cpu.embedding"]
CONTROL = list(CONTROL_QUEUES)  # the catalog names the control queues


@pytest.fixture(scope="session")
def worker(stack: dict[str, str], redis_client) -> Iterator[CeleryWorker]:  # type: ignore[no-untyped-def]
    """One node serving the control queues and the CPU model queues, like standalone."""
    node = CeleryWorker(CONTROL + ALL_COMPUTE_QUEUES, name="e2e", concurrency=2)
    try:
        node.wait_ready(redis_client)
        yield node
    finally:
        node.stop()


@pytest.fixture()
def app(stack: dict[str, str]):  # type: ignore[no-untyped-def]
    from api import create_app
    from marketplace.settings import get_settings

    application = create_app(get_settings())
    application.config["TESTING"] = True
    return application


@pytest.fixture()
def client(app):  # type: ignore[no-untyped-def]
    return app.test_client()


@pytest.fixture(autouse=True)
def _end_what_the_test_left_active(request):  # type: ignore[no-untyped-def]
    """Tasks a test left active (a job on a queue with no real node, one it stopped watching)
    would be other users of the same queues in later tests, and take their fair turns there:
    they end Cancelled, with what they had not run, when the test that made them ends."""
    if "postgres" not in request.fixturenames:
        yield
        return
    import psycopg2

    url = request.getfixturevalue("postgres").url.replace("postgresql+psycopg2://", "postgresql://", 1)

    def run(sql: str, *args: object) -> list:  # type: ignore[type-arg]
        conn = psycopg2.connect(url)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    ((started,),) = run("SELECT now()")
    yield
    try:
        run("""
            WITH t AS (
                UPDATE tasks SET status = 'Cancelled', backlog = 0, finished_at = now(),
                       error = COALESCE(error, 'left active by the test that made it')
                WHERE status IN ('Created', 'Scheduled', 'InProgress') AND created_at >= %s
                RETURNING id
            )
            UPDATE subtasks SET status = 'Cancelled' FROM t
            WHERE subtasks.task_id = t.id AND subtasks.status IN ('Pending', 'Running')
        """, started)
    except psycopg2.OperationalError:  # a test that stopped the server: nothing of it is left to run
        pass

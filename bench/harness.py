"""A throwaway stack for benchmarks: fresh database, private Redis, local object store, real workers."""
from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from marketplace.catalog import CONTROL_QUEUES  # noqa: E402 - reads no settings
from marketplace.infra.prepared import Prepared  # noqa: E402 - reads no settings
from tests.support.servers import CeleryWorker, Postgres, RedisServer  # noqa: E402

CONTROL = list(CONTROL_QUEUES)  # the catalog names the control queues


@contextmanager
def stack(extra_env: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """Point this process at fresh servers; yields {'env', 'redis', 'pg'}."""
    pg = Postgres()
    redis_server = RedisServer()
    objects = tempfile.mkdtemp(prefix="mp-bench-objects-")
    env = {
        "MARKETPLACE_DATABASE_URL": pg.url,
        "MARKETPLACE_REDIS_URL": redis_server.url,
        "MARKETPLACE_STORAGE_DIR": objects,
        "MARKETPLACE_LOG_JSON": "false",
        "MARKETPLACE_LOG_LEVEL": "WARNING",
        "MARKETPLACE_RATE_LIMIT": "1000000/minute",
        "MARKETPLACE_ANONYMOUS_RATE_LIMIT": "1000000/minute",
        "MARKETPLACE_SIGNUP_RATE_LIMIT": "1000000/minute",  # the benches sign up many accounts from 127.0.0.1
        "MARKETPLACE_SIGNUP_CREDITS": "1000000",
        "MARKETPLACE_DEFAULT_MAX_ACTIVE_TASKS": "100000",
        "MARKETPLACE_DEFAULT_DAILY_SPEND": "100000000",
        **(extra_env or {}),
    }
    os.environ.pop("MARKETPLACE_S3_ENDPOINT_URL", None)
    os.environ.update(env)
    from marketplace.infra import migrate
    from marketplace.settings import reset_settings

    reset_settings()
    migrate.upgrade(pg.url)
    try:
        yield {"env": env, "redis": redis_server, "pg": pg}
    finally:
        from marketplace.infra.db import dispose_engine

        dispose_engine()
        redis_server.stop()
        pg.drop()


def start_worker(queues: list[str], *, concurrency: int = 2, name: str = "bench", app: str = "marketplace",
                 env: dict[str, str] | None = None) -> CeleryWorker:
    node = CeleryWorker(queues, name=name, concurrency=concurrency, env=env,
                        extra_args=["--loglevel", "WARNING"])
    if app != "marketplace":
        node.proc.kill()
        node.proc.wait()
        cmd_env = {**os.environ, **(env or {})}
        import subprocess

        node.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", app, "worker", "-Q", ",".join(queues), "-c", str(concurrency),
             "-n", f"{name}@%h", "-O", "fair", "--without-gossip", "--without-mingle", "--loglevel", "WARNING"],
            cwd=ROOT, env=cmd_env, stdout=open(node.log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )
    return node


def wait_marketplace_ready(node: CeleryWorker, timeout: float = 60) -> None:
    from marketplace.infra.redis_client import get_redis

    node.wait_ready(get_redis(), timeout=timeout)


def api_client() -> Any:
    from api import create_app

    app = create_app()
    return app.test_client()


def new_user(client: Any) -> dict[str, str]:
    from tests.support.api import register

    return register(client)["headers"]


# The poll, prepared once per connection (`marketplace/prepared.py`): ~0.1 ms of this process's
# CPU per poll against ~0.2 through SQLAlchemy's text(), and PostgreSQL skips the planning. The polls of a 7 s job with
# the adaptive interval below took ~0.4 s of this process's CPU and 0.25 s of PostgreSQL's
# through text(): CPU the job it measured needed.
_POLL = Prepared("bench_poll", "SELECT status FROM tasks WHERE id = :id", types={"id": "uuid"})


def wait_task_done(task_id: str, timeout: float = 600, every: float | None = None) -> tuple[str, float]:
    """Poll the task row (cheap) until final; returns (status, monotonic time seen).

    `every`: a fixed interval, for a comparison whose other side polls at that rate, or for a
    long job where a poll every few milliseconds would take CPU from the job it measures."""
    from marketplace.infra.db import autocommit

    begun = time.monotonic()
    deadline = begun + timeout
    with autocommit() as conn:  # one connection; each poll is a read of its own
        while time.monotonic() < deadline:
            status = _POLL.execute(conn, {"id": task_id}).scalar()
            if status in ("Done", "Failed", "Cancelled"):
                return status, time.monotonic()
            # Poll 2 ms early, then at 0.2% of the time waited (at most 20 ms): the reading is
            # late by at most 0.2% (or 2 ms).
            time.sleep(every or min(0.02, max(0.002, (time.monotonic() - begun) * 0.002)))
    raise TimeoutError(f"task {task_id} not final after {timeout}s")


def settle(timeout: float = 60) -> None:
    """Wait until the marketplace's after-work is done: buffered audit records chained (it runs a
    second after each finalize) and a moment of quiet, so the next measurement, of either side,
    does not pay for it."""
    from sqlalchemy import text

    from marketplace.infra.db import get_engine

    deadline = time.monotonic() + timeout
    time.sleep(1.2)  # the chaining request is sent with a 1 s countdown
    with get_engine().connect() as conn:
        while time.monotonic() < deadline:
            if not conn.execute(text("SELECT EXISTS (SELECT 1 FROM audit_pending)")).scalar():
                break
            time.sleep(0.05)
            conn.rollback()
    time.sleep(0.3)

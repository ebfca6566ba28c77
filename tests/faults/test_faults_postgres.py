"""PostgreSQL goes away mid-job (a throwaway pgserver instance, never the machine's server):
the API answers 503 problems, /readyz 503, workers retry; once it is back every job finishes."""
from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from marketplace.catalog import CONTROL_QUEUES
from tests.support.api import register, wait_for_task
from tests.support.env import switched_env
from tests.support.servers import CeleryWorker

CONTROL = list(CONTROL_QUEUES)  # the catalog names the control queues
pytestmark = pytest.mark.slow


class Throwaway:
    def __init__(self) -> None:
        from marketplace.infra.embedded import EmbeddedPostgres

        self.dir = Path(tempfile.mkdtemp(prefix="mp-pg-fault-")) / "pg"
        self.embedded = EmbeddedPostgres(self.dir)
        self.url = self.embedded.url("marketplace")

    def stop(self) -> None:
        from pgserver._commands import pg_ctl

        server = self.embedded.server
        pg_ctl(["-w", "stop", "-m", "fast"], pgdata=server.pgdata, user=server.system_user)

    def crash(self) -> None:
        """Stop without a shutdown checkpoint, as a crash would: unflushed WAL is lost."""
        from pgserver._commands import pg_ctl

        server = self.embedded.server
        pg_ctl(["-w", "stop", "-m", "immediate"], pgdata=server.pgdata, user=server.system_user)

    def start(self) -> None:
        server = self.embedded.server
        with server._lock:
            server.ensure_postgres_running()

    def drop(self) -> None:
        self.embedded.stop()


@pytest.fixture()
def throwaway_pg(own_broker) -> Iterator[Throwaway]:  # type: ignore[no-untyped-def]
    from marketplace.infra import migrate

    pg = Throwaway()
    migrate.upgrade(pg.url)
    try:
        with switched_env(MARKETPLACE_DATABASE_URL=pg.url):
            yield pg
    finally:
        pg.drop()


@contextmanager
def _api_and_node(name: str) -> Iterator[tuple]:  # type: ignore[type-arg]
    """An API client (built now, under the current environment), a user, and a node on cpu.generic."""
    from api import create_app
    from marketplace.infra.redis_client import get_redis
    from marketplace.settings import get_settings

    client = create_app(get_settings()).test_client()
    node = CeleryWorker(CONTROL + ["cpu.generic"], name=f"{name}-{uuid.uuid4().hex[:4]}", concurrency=2)
    node.wait_ready(get_redis())
    try:
        yield client, register(client), node
    finally:
        node.stop()


def _job_under_way(client, user, inputs: list, *, sleep_s: float, done: int) -> str:  # type: ignore[no-untyped-def]
    """Submit an echo job of one subtask per input; return its id once `done` subtasks finished."""
    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": inputs, "batch_size": 1,
                                         "params": {"sleep_s": sleep_s}}, headers=user["headers"])
    assert resp.status_code == 202
    task_id = resp.get_json()["id"]
    deadline = time.monotonic() + 60
    while client.get(f"/v1/tasks/{task_id}", headers=user["headers"]).get_json()["progress"]["done"] < done:
        assert time.monotonic() < deadline, "no subtask finished"
        time.sleep(0.05)
    return task_id


def test_database_outage_gives_503s_then_every_job_finishes(throwaway_pg):  # type: ignore[no-untyped-def]
    with _api_and_node("pgdown") as (client, user, _node):
        inputs = list(range(8))
        task_id = _job_under_way(client, user, inputs, sleep_s=0.5, done=1)

        throwaway_pg.stop()
        down = client.post("/v1/tasks", json={"model": "echo", "inputs": [1]}, headers=user["headers"])
        assert down.status_code == 503, down.get_data(as_text=True)
        assert down.content_type == "application/problem+json" and "database" in down.get_json()["detail"]
        assert down.headers.get("Retry-After")
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.get_json()["checks"]["database"] != "ok"
        assert client.get(f"/v1/tasks/{task_id}", headers=user["headers"]).status_code == 503
        time.sleep(4)  # subtasks finishing now cannot record their outcome: they retry
        throwaway_pg.start()

        assert client.get("/readyz").status_code == 200
        doc = wait_for_task(client, user["headers"], task_id, timeout=120)
        assert doc["status"] == "Done", doc
        assert client.get(f"/v1/tasks/{task_id}/result", headers=user["headers"]).get_json()["outputs"] == inputs
        later = client.post("/v1/tasks", json={"model": "echo", "inputs": [1, 2]}, headers=user["headers"])
        assert wait_for_task(client, user["headers"], later.get_json()["id"], timeout=60)["status"] == "Done"


def test_a_database_crash_mid_job_loses_no_subtask_and_no_charge(throwaway_pg):  # type: ignore[no-untyped-def]
    """An immediate stop, as in a crash (connections cut mid-statement, no shutdown checkpoint):
    subtasks that were writing retry instead of raising out of the chord (which broke the chord
    and left them Running), and the job still ends Done, every output and charge once."""
    from tests.faults.test_faults_workers import _assert_exactly_once, _drive_recovery

    with switched_env(MARKETPLACE_RECOVERY_STALL_SECONDS="2"), _api_and_node("pgcrash") as (client, user, node):
        inputs = list(range(12))
        task_id = _job_under_way(client, user, inputs, sleep_s=0.2, done=3)
        throwaway_pg.crash()
        time.sleep(1)
        throwaway_pg.start()
        doc = _drive_recovery(client, user, task_id, timeout=120)
        assert doc["status"] == "Done", (doc, node.tail(40))
        _assert_exactly_once(client, user, task_id, inputs)

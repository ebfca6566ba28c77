"""Scale from zero (the KEDA `ScaledObject`s of `deploy/k8s`): with no node on a queue, the work
waiting for it shows in `marketplace_subtasks_queued{queue}`, and a node that comes up takes it
with the scheduler's capacity check on.

Pending work waits in PostgreSQL and the dispatcher releases to a queue only what its live nodes
can start, so with zero nodes the broker list is empty: the gauge is the only signal there is.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import CONTROL
from tests.support.api import api_app, register, wait_for_task
from tests.support.env import private_broker, private_database
from tests.support.servers import CeleryWorker
from tests.support.wait import wait_until


@pytest.fixture()
def market(stack) -> Iterator[None]:  # type: ignore[no-untyped-def]
    with private_database(), private_broker():
        yield


@pytest.fixture()
def client(market):  # type: ignore[no-untyped-def]
    return api_app().test_client()


@pytest.fixture()
def nodes(market) -> Iterator:  # type: ignore[no-untyped-def]
    from marketplace.infra.redis_client import get_redis

    started: list[CeleryWorker] = []

    def start(queues: list[str]) -> CeleryWorker:
        worker = CeleryWorker(queues, name=f"zero-{uuid.uuid4().hex[:6]}", concurrency=1)
        started.append(worker)
        worker.wait_ready(get_redis())
        return worker

    yield start
    for worker in started:
        worker.stop()


def _gauges() -> dict[str, dict[str, float]]:
    """{metric: {queue: value}} of the subtask gauges, as a scrape reads them now."""
    from marketplace.observability.metrics import STATE

    out: dict[str, dict[str, float]] = {}
    for family in STATE.collect():
        if family.name in ("marketplace_subtasks_queued", "marketplace_subtasks_running"):
            out[family.name] = {s.labels["queue"]: s.value for s in family.samples}
    return out


def _status(client, user, task_id: str) -> dict:  # type: ignore[no-untyped-def,type-arg]
    return client.get(f"/v1/tasks/{task_id}", headers=user["headers"]).get_json()


def test_work_for_a_queue_with_no_node_is_counted_and_a_node_that_comes_takes_it(client, nodes):  # type: ignore[no-untyped-def]
    nodes(CONTROL)  # the scheduler runs; no node serves any compute queue
    user = register(client)
    echo = client.post("/v1/tasks", json={"model": "echo", "inputs": [1, 2, 3, 4, 5], "batch_size": 2},
                       headers=user["headers"]).get_json()["id"]
    anywhere = client.post("/v1/tasks", json={"model": "embedding", "inputs": ["a", "b"], "batch_size": 2,
                                              "device": "any"}, headers=user["headers"]).get_json()["id"]
    wait_until(lambda: (_status(client, user, echo).get("status_reason") or "").startswith("waiting: no live worker"),
               30, "the echo task waiting for a node")
    assert _status(client, user, echo)["status"] == "Created"

    queued = _gauges()["marketplace_subtasks_queued"]
    assert queued["cpu.generic"] == 3  # five items in twos: three subtasks
    # `device: any` may run on either queue: each of them sees it (whichever comes first takes it).
    assert queued["gpu.embedding"] == 1 and queued["cpu.embedding"] == 1
    assert queued["gpu.resnet50"] == 0
    assert set(_gauges()["marketplace_subtasks_running"].values()) == {0}

    nodes(["cpu.generic"])  # what KEDA does when the gauge says so
    assert wait_for_task(client, user["headers"], echo, timeout=60)["status"] == "Done"
    wait_until(lambda: _gauges()["marketplace_subtasks_queued"]["cpu.generic"] == 0, 10, "cpu.generic drained")
    assert _gauges()["marketplace_subtasks_queued"]["cpu.embedding"] == 1  # still no node for it
    client.post(f"/v1/tasks/{anywhere}/cancel", headers=user["headers"])

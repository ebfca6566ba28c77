"""Capability matching in the scheduler: queue choice, waiting with a reason, schedule timeout.

Tasks are created with the task service (no `schedule` message is published), so
no scheduler worker races these direct calls of `schedule_task`.
"""
from __future__ import annotations

import io
import json
import uuid

import pytest

from marketplace.catalog import get_catalog
from marketplace.scheduling.service import candidate_queues, choose_queue
from tests.support.api import register


@pytest.fixture()
def user(client):  # type: ignore[no-untyped-def]
    return register(client)


@pytest.fixture()
def file_item(client, user):  # type: ignore[no-untyped-def]
    resp = client.post("/v1/files", data={"file": (io.BytesIO(b"not really an image"), "x.png")},
                       headers=user["headers"], content_type="multipart/form-data")
    assert resp.status_code == 201, resp.get_json()
    return {"file": resp.get_json()["id"]}


@pytest.fixture()
def fake_nodes(redis_client):  # type: ignore[no-untyped-def]
    """Write real heartbeat records for pretend nodes; removed afterwards."""
    from marketplace.registry.service import heartbeat

    names: list[str] = []

    def add(queues: list[str], *, concurrency: int = 1, unavailable: dict | None = None) -> str:
        hostname = f"fake-{uuid.uuid4().hex[:8]}@test"
        heartbeat(redis_client, info={"hostname": hostname, "queues": queues, "models": [],
                                      "concurrency": concurrency, "unavailable": unavailable or {}})
        names.append(hostname)
        return hostname

    yield add
    for hostname in names:
        redis_client.delete(f"marketplace:worker:{hostname}")


def _create(user, **body):  # type: ignore[no-untyped-def]
    from marketplace.infra.db import session_scope
    from marketplace.tasks.schemas import TaskRequest
    from marketplace.tasks.service import create_task

    with session_scope() as session:
        task, _ = create_task(session, user_id=uuid.UUID(user["id"]), request=TaskRequest(**body))
        return str(task.id)


# Pure choice ----------------------------------------------------------------

def test_any_prefers_a_gpu_queue_with_capacity_else_cpu():
    spec = get_catalog().get("embedding")
    candidates = candidate_queues(spec, "any")
    assert candidates == ["gpu.embedding", "cpu.embedding"]
    assert choose_queue(candidates, {"gpu.embedding": 1, "cpu.embedding": 4}) == "gpu.embedding"
    assert choose_queue(candidates, {"gpu.embedding": 0, "cpu.embedding": 4}) == "cpu.embedding"
    assert choose_queue(candidates, {"cpu.embedding": 2}) == "cpu.embedding"
    assert choose_queue(candidates, {}) is None
    # Capability check off: nothing is known, so `any` takes CPU, not a possibly empty GPU queue.
    assert choose_queue(candidates, None) == "cpu.embedding"


def test_explicit_device_gets_only_that_queue():
    spec = get_catalog().get("embedding")
    assert candidate_queues(spec, "gpu") == ["gpu.embedding"]
    assert choose_queue(["gpu.embedding"], {"cpu.embedding": 3}) is None
    echo = get_catalog().get("echo")
    assert candidate_queues(echo, "any") == ["cpu.generic"]
    assert candidate_queues(echo, "gpu") == []


def test_capacity_skips_nodes_that_refuse_the_model(stack, fake_nodes, redis_client):  # type: ignore[no-untyped-def]
    from marketplace.registry.service import live_capacity, live_workers

    bad = fake_nodes(["cpu.generic"], concurrency=3, unavailable={"generic": "no sandbox"})
    records = [w for w in live_workers(redis_client) if w["hostname"] == bad]
    assert live_capacity(redis_client, model="echo", workers=records) == {"cpu.generic": 3}
    assert live_capacity(redis_client, model="generic", workers=records) == {}


# Against real heartbeats and the real database ---------------------------------

def test_any_goes_to_gpu_when_a_gpu_node_heartbeats(stack, user, file_item, fake_nodes, redis_client):  # type: ignore[no-untyped-def]
    from marketplace.scheduling.service import schedule_task

    fake_nodes(["gpu.resnet50"])  # nobody really consumes it: the published subtasks just wait
    task_id = _create(user, model="resnet50", inputs=[file_item], device="any")
    outcome = schedule_task(task_id)
    assert (outcome.status, outcome.queue) == ("scheduled", "gpu.resnet50")
    _drop_queue(redis_client, "gpu.resnet50")


def test_any_falls_back_to_cpu_without_a_gpu_node(stack, user, file_item, fake_nodes, redis_client):  # type: ignore[no-untyped-def]
    from marketplace.registry.service import live_capacity
    from marketplace.scheduling.service import schedule_task

    assert live_capacity(redis_client, model="resnet50").get("gpu.resnet50", 0) == 0
    fake_nodes(["cpu.resnet50"])
    task_id = _create(user, model="resnet50", inputs=[file_item], device="any")
    outcome = schedule_task(task_id)
    assert (outcome.status, outcome.queue) == ("scheduled", "cpu.resnet50")
    _drop_queue(redis_client, "cpu.resnet50")


def test_waiting_task_shows_why_then_fails_after_the_schedule_timeout(stack, client, user, file_item, monkeypatch):  # type: ignore[no-untyped-def]
    from marketplace.scheduling.service import schedule_task, waiting_tasks
    from marketplace.settings import get_settings

    task_id = _create(user, model="resnet50", inputs=[file_item], device="gpu")
    # Not yet through its own scheduling step (its `schedule` message is on the way): not waiting.
    assert task_id not in waiting_tasks(models=["resnet50"])
    outcome = schedule_task(task_id)
    assert outcome.status == "waiting"
    doc = client.get(f"/v1/tasks/{task_id}", headers=user["headers"]).get_json()
    assert doc["status"] == "Created"
    assert doc["status_reason"] == "waiting: no live worker serves gpu.resnet50 for model 'resnet50'"
    assert task_id in waiting_tasks(models=["resnet50"])  # what a new node's `wake` retries at once
    assert task_id not in waiting_tasks(models=["echo"])

    monkeypatch.setattr(get_settings(), "schedule_timeout", 0.0)
    outcome = schedule_task(task_id)
    assert outcome.status == "failed"
    doc = client.get(f"/v1/tasks/{task_id}", headers=user["headers"]).get_json()
    assert doc["status"] == "Failed"
    assert "no live worker serves gpu.resnet50" in doc["error"] and "schedule timeout" in doc["error"]
    assert doc["status_reason"] is None
    # Once final, further schedule attempts are no-ops.
    assert schedule_task(task_id).status == "noop"


def test_a_release_puts_the_catalog_time_limits_on_every_subtask_message(stack, redis_client):  # type: ignore[no-untyped-def]
    """The worker enforces the `timelimit` header: [hard, soft] from the catalog entry."""
    from marketplace.scheduling.dispatch import publish

    task_id = str(uuid.uuid4())
    publish(task_id, [f"{uuid.uuid4()}:1", f"{uuid.uuid4()}:1"], queue="gpu.resnet50",
            time_limit=get_catalog().get("resnet50").time_limit)
    messages = [json.loads(raw) for key in redis_client.scan_iter(match="gpu.resnet50*")
                for raw in redis_client.lrange(key, 0, -1)]
    mine = [m for m in messages if m["headers"].get("task") == "workers.run_subtask"]
    assert len(mine) >= 2
    assert all(m["headers"]["timelimit"] == [630.0, 600.0] for m in mine), [m["headers"]["timelimit"] for m in mine]
    _drop_queue(redis_client, "gpu.resnet50")


def _drop_queue(redis_client, queue: str) -> None:  # type: ignore[no-untyped-def]
    for key in redis_client.scan_iter(match=f"{queue}*"):
        redis_client.delete(key)

"""Compute nodes with real workers: registration, heartbeat expiry, refusing `generic`,
and a task waiting for a missing capability that starts when a node for it appears."""
from __future__ import annotations

import os
import signal
import time
import uuid

import pytest

from tests.support.api import register, wait_for_task
from tests.support.wait import wait_until

NO_WARMUP = {"MARKETPLACE_WARMUP_MODELS": "false"}


@pytest.fixture()
def user(client):  # type: ignore[no-untyped-def]
    return register(client)


@pytest.fixture()
def admin(client):  # type: ignore[no-untyped-def]
    """A node's facts and the reasons it refuses a model are shown to admins only."""
    from tests.support.accounts import make_admin

    return make_admin(client)


def _listed(client, user, hostname: str) -> dict | None:  # type: ignore[no-untyped-def]
    resp = client.get("/v1/workers", headers=user["headers"])
    assert resp.status_code == 200, resp.get_json()
    return next((w for w in resp.get_json()["workers"] if w["hostname"] == hostname), None)


def _row(hostname: str):  # type: ignore[no-untyped-def]
    from marketplace.infra.db import session_scope
    from marketplace.registry.models import Worker

    with session_scope() as session:
        row = session.get(Worker, hostname)
        return None if row is None else (row.status, row.deregistered_at, row.queues)


def test_node_registers_with_facts_refuses_generic_without_sandbox_and_deregisters_on_sigterm(  # type: ignore[no-untyped-def]
    client, user, admin, nodes, redis_client,
):
    node = nodes(["cpu.generic"], concurrency=1, env={**NO_WARMUP, "MARKETPLACE_SANDBOX": "none"})
    node.wait_ready(redis_client)

    doc = _listed(client, admin, node.hostname)
    assert doc is not None and doc["status"] == "online"
    assert doc["queues"] == ["cpu.generic"] and set(doc["models"]) == {"echo", "generic"}
    assert doc["capacity"] == 1 and doc["running"] == 0 and doc["last_heartbeat"]
    facts = doc["facts"]
    assert facts["cpu_count"] == os.cpu_count() and facts["memory_bytes"] > 0
    assert isinstance(facts["gpus"], list) and facts["gpu_count"] == len(facts["gpus"])
    # No sandbox: `generic` is advertised as unavailable (with the reason), `echo` is not.
    assert set(doc["unavailable"]) == {"generic"} and "no sandbox configured" in doc["unavailable"]["generic"]
    assert "will NOT run 'generic'" in node.tail(200)
    assert _row(node.hostname)[0] == "online"

    models = {m["name"]: m for m in client.get("/v1/models", headers=user["headers"]).get_json()["models"]}
    assert models["echo"]["live_workers"]["cpu.generic"] == models["generic"]["live_workers"]["cpu.generic"] + 1
    assert models["resnet50"]["price"]["cpu"]["start_fee"] == "0.002"
    assert models["resnet50"]["queues"] == ["gpu.resnet50", "cpu.resnet50"]

    started = time.monotonic()
    node.stop(signal.SIGTERM)
    assert not redis_client.exists(f"marketplace:worker:{node.hostname}")
    assert time.monotonic() - started < 20
    doc = _listed(client, user, node.hostname)
    assert doc is not None and doc["status"] == "offline" and doc["deregistered_at"]
    status, deregistered_at, _ = _row(node.hostname)
    assert status == "offline" and deregistered_at is not None

    # The filters gRPC ListWorkers has (REST ignored ?status=offline and answered every node).
    def hostnames(query: str) -> set[str]:
        resp = client.get(f"/v1/workers?{query}", headers=user["headers"])
        assert resp.status_code == 200, resp.get_json()
        return {w["hostname"] for w in resp.get_json()["workers"]}

    assert node.hostname in hostnames("status=offline") and node.hostname not in hostnames("status=online")
    assert node.hostname in hostnames("queue=cpu.generic") and node.hostname not in hostnames("queue=gpu.resnet50")
    assert all(w["status"] == "offline" for w in client.get("/v1/workers?status=offline",
                                                            headers=user["headers"]).get_json()["workers"])
    bad = client.get("/v1/workers?status=bogus", headers=user["headers"])
    assert bad.status_code == 422 and bad.get_json()["errors"][0]["field"] == "status"


def test_killed_node_goes_offline_after_the_heartbeat_ttl(client, user, nodes, redis_client):  # type: ignore[no-untyped-def]
    from marketplace.infra.db import session_scope
    from marketplace.registry.service import sweep
    from marketplace.settings import get_settings

    node = nodes(["cpu.generic"], concurrency=1, env=NO_WARMUP)
    node.wait_ready(redis_client)
    os.killpg(node.proc.pid, signal.SIGKILL)  # the whole node: no worker_shutdown runs
    node.proc.wait(timeout=10)
    killed = time.monotonic()
    assert _listed(client, user, node.hostname)["status"] == "online"  # until the TTL runs out

    ttl = get_settings().heartbeat_ttl
    wait_until(lambda: _listed(client, user, node.hostname)["status"] == "offline", ttl + 30, "the TTL to expire")
    assert time.monotonic() - killed >= ttl - get_settings().heartbeat_interval - 0.5
    assert _row(node.hostname)[0] == "online"  # the table learns it from the sweep job
    with session_scope() as session:
        report = sweep(session, r=redis_client)
    assert node.hostname in report["offline"]
    status, deregistered_at, _ = _row(node.hostname)
    assert status == "offline" and deregistered_at is not None


def test_task_waits_for_a_missing_capability_then_starts_when_a_node_for_it_appears(  # type: ignore[no-untyped-def]
    client, user, worker, nodes, redis_client,
):
    from marketplace.registry.service import live_capacity

    assert live_capacity(redis_client).get("gpu.embedding", 0) == 0
    resp = client.post("/v1/tasks", json={"model": "embedding", "inputs": ["a cat", "a dog"], "device": "gpu"},
                       headers=user["headers"])
    assert resp.status_code == 202, resp.get_json()
    task_id = resp.get_json()["id"]

    doc = wait_until(lambda: (d := client.get(f"/v1/tasks/{task_id}", headers=user["headers"]).get_json())
                 .get("status_reason") and d, 60, "the scheduler to record why the task waits")
    assert doc["status"] == "Created"
    assert doc["status_reason"] == "waiting: no live worker serves gpu.embedding for model 'embedding'"
    time.sleep(2)  # still waiting after several scheduler retries
    assert client.get(f"/v1/tasks/{task_id}", headers=user["headers"]).get_json()["status"] == "Created"

    node = nodes(["gpu.embedding"], concurrency=1, env=NO_WARMUP)
    node.wait_ready(redis_client)
    appeared = time.monotonic()
    doc = wait_for_task(client, user["headers"], task_id, statuses=("Scheduled", "InProgress", "Done", "Failed"),
                        timeout=60)
    assert time.monotonic() - appeared < 15  # woken by the node's registration or the <=10 s backoff
    assert doc["queue"] == "gpu.embedding" and doc["status_reason"] is None
    # The first attempt imports sentence-transformers for seconds: the node reports it running.
    busy = wait_until(lambda: (w := _listed(client, user, node.hostname)) and w["running"] >= 1 and w, 30,
                  "the node to report a running subtask")
    assert busy["running"] == 1 and busy["free"] == 0

    # It really ran on that node: on a CPU-only machine the GPU executor says why it cannot.
    doc = wait_for_task(client, user["headers"], task_id, timeout=120)
    subs = client.get(f"/v1/tasks/{task_id}/subtasks", headers=user["headers"]).get_json()["subtasks"]
    assert {s["worker"] for s in subs} == {node.hostname}
    import torch

    if torch.cuda.is_available():
        assert doc["status"] == "Done", doc
    else:
        assert doc["status"] == "Failed" and "no CUDA device" in doc["error"], doc


def test_generic_subtask_on_a_node_without_sandbox_fails_with_the_reason(stack, user, monkeypatch):  # type: ignore[no-untyped-def]
    from sqlalchemy import select

    from marketplace.infra.db import session_scope
    from marketplace.settings import get_settings
    from marketplace.tasks.models import SubTask, Task
    from marketplace.tasks.schemas import TaskRequest
    from marketplace.tasks.service import create_task
    from workers import node, runner

    monkeypatch.setattr(get_settings(), "sandbox", "none")
    node._cached_sandbox_problem.cache_clear()
    try:
        with session_scope() as session:
            task, _ = create_task(session, user_id=uuid.UUID(user["id"]), request=TaskRequest(
                model="generic", inputs=[1, 2], params={"command": ["cat"]}))
            sub_id = str(session.scalar(select(SubTask.id).where(SubTask.task_id == task.id)))
            task_id = task.id
        first = runner.execute(sub_id, hostname="refuser@test", retries_left=True)
        assert isinstance(first, runner.Retry) and "refuses generic" in first.error
        last = runner.execute(sub_id, hostname="refuser@test", retries_left=False)
        assert last["ok"] is False and "no sandbox configured" in last["error"]
        with session_scope() as session:
            task = session.get(Task, task_id)
            assert task.status == "Failed" and "refuses generic" in task.error
        assert node.refusal("echo") is None
    finally:
        node._cached_sandbox_problem.cache_clear()


def test_a_node_without_torchvision_refuses_resnet50_and_a_job_waits_naming_it(  # type: ignore[no-untyped-def]
    client, user, admin, worker, nodes, redis_client,
):
    """`.venv` cannot hold torchvision beside its CPU torch (`make vision` builds the venv that
    can): a node from it refuses resnet50, where it took every job and failed each subtask with
    ModuleNotFoundError. The waiting task says which node refuses and why."""
    import importlib.util
    import io

    assert importlib.util.find_spec("torchvision") is None, "this test needs a Python without torchvision"
    node = nodes(["cpu.resnet50"], concurrency=1, env=NO_WARMUP)
    node.wait_ready(redis_client)
    doc = _listed(client, admin, node.hostname)
    assert set(doc["unavailable"]) == {"resnet50"}, doc
    reason = doc["unavailable"]["resnet50"]
    assert "torchvision" in reason and " not installed in " in reason and ".venv-vision" in reason, reason
    assert "will NOT run 'resnet50'" in node.tail(200)
    models = {m["name"]: m for m in client.get("/v1/models", headers=user["headers"]).get_json()["models"]}
    assert models["resnet50"]["live_workers"].get("cpu.resnet50", 0) == 0

    upload = client.post("/v1/files", data={"file": (io.BytesIO(b"\x89PNG not really"), "x.png")},
                         headers=user["headers"], content_type="multipart/form-data")
    resp = client.post("/v1/tasks", json={"model": "resnet50", "device": "cpu",
                                          "inputs": [{"file": upload.get_json()["id"]}]}, headers=user["headers"])
    assert resp.status_code == 202, resp.get_json()
    task_id = resp.get_json()["id"]
    doc = wait_until(lambda: (d := client.get(f"/v1/tasks/{task_id}", headers=user["headers"]).get_json())
                     .get("status_reason") and d, 60, "the scheduler to record why the task waits")
    assert doc["status"] == "Created"
    assert doc["status_reason"] == (f"waiting: no live worker serves cpu.resnet50 for model 'resnet50' "
                                    f"({node.hostname} refuses it: {reason})")
    assert client.post(f"/v1/tasks/{task_id}/cancel", headers=user["headers"]).status_code == 202

"""Idempotency, listing with keyset pagination, cancel, and isolation between users."""
from __future__ import annotations

import threading
import uuid

import pytest

from tests.support.api import register, wait_for_task

WAITING = {"model": "embedding", "inputs": ["stays waiting"], "device": "gpu"}  # no gpu.embedding worker in tests


def test_idempotency_key_same_body_same_task_other_body_409(client, user):  # type: ignore[no-untyped-def]
    key = {**user["headers"], "Idempotency-Key": f"k-{uuid.uuid4().hex}"}
    first = client.post("/v1/tasks", json=WAITING, headers=key)
    assert first.status_code == 202
    again = client.post("/v1/tasks", json=WAITING, headers=key)
    assert again.status_code == 200 and again.get_json()["id"] == first.get_json()["id"]
    other = client.post("/v1/tasks", json={**WAITING, "inputs": ["something else"]}, headers=key)
    assert other.status_code == 409 and other.content_type == "application/problem+json"
    assert other.get_json()["field"] == "Idempotency-Key"
    # keys are per user: another user's identical key makes their own task
    u2 = register(client)
    theirs = client.post("/v1/tasks", json=WAITING, headers={**u2["headers"], "Idempotency-Key": key["Idempotency-Key"]})
    assert theirs.status_code == 202 and theirs.get_json()["id"] != first.get_json()["id"]
    assert len(client.get("/v1/tasks", headers=user["headers"]).get_json()["tasks"]) == 1


def test_concurrent_duplicates_get_one_task(stack, client):  # type: ignore[no-untyped-def]
    """The loser of a race on the unique key gets the winner's task, not a 500."""
    from marketplace.infra.db import new_session
    from marketplace.tasks.models import Task
    from marketplace.tasks.schemas import TaskRequest
    from marketplace.tasks.service import create_task

    u = register(client)
    uid = uuid.UUID(u["id"])
    req = TaskRequest.model_validate(WAITING)
    key = f"race-{uuid.uuid4().hex}"
    first = new_session()
    task_a, created_a = create_task(first, user_id=uid, request=req, idempotency_key=key)
    assert created_a
    out: dict[str, object] = {}

    def loser() -> None:
        second = new_session()
        try:
            # blocks on the unique index until the first transaction commits
            task_b, created_b = create_task(second, user_id=uid, request=req, idempotency_key=key)
            out["result"] = (task_b.id, created_b)
            second.commit()
        except Exception as exc:  # noqa: BLE001 - reported below
            out["error"] = exc
        finally:
            second.close()

    t = threading.Thread(target=loser)
    t.start()
    t.join(1.0)
    assert t.is_alive(), "the second insert should wait for the first transaction"
    first.commit()
    first.close()
    t.join(30)
    assert "error" not in out, out
    assert out["result"] == (task_a.id, False)
    s = new_session()
    try:
        from sqlalchemy import func, select

        assert s.scalar(select(func.count()).select_from(Task).where(Task.idempotency_key == key)) == 1
    finally:
        s.close()


def test_a_submit_without_a_key_stores_what_the_keyed_path_stores(client, user):  # type: ignore[no-untyped-def]
    """The unkeyed submit writes the task and its subtasks in one SQL statement (`_INSERT_TASK`),
    the keyed one through the ORM: the two must store the same rows."""
    from sqlalchemy import select

    from marketplace.infra.db import new_session
    from marketplace.tasks.models import SubTask, Task

    texts = ["one", "twö", "thr\u00e9e \"quoted\"", "four", "five {x}", "six", "seven"]
    body = {**WAITING, "inputs": texts, "batch_size": 3, "priority": 4, "max_cost": "50.5",
            "params": {"normalize": False}, "webhook_url": "http://127.0.0.1:9/hook"}
    plain = client.post("/v1/tasks", json=body, headers=user["headers"])
    keyed = client.post("/v1/tasks", json=body, headers={**user["headers"], "Idempotency-Key": uuid.uuid4().hex})
    assert plain.status_code == keyed.status_code == 202, (plain.get_json(), keyed.get_json())
    assert plain.get_json()["subtasks"] == 3
    own = {"id", "idempotency_key", "created_at", "progress_at", "trace_id", "status", "status_reason",
           "scheduled_at", "queue"}  # the row's identity, and what a scheduler that finds no gpu node may write
    session = new_session()
    try:
        rows = [session.get(Task, uuid.UUID(r.get_json()["id"])) for r in (plain, keyed)]
        columns = [c.key for c in Task.__table__.columns if c.key not in own]
        assert {c: getattr(rows[0], c) for c in columns} == {c: getattr(rows[1], c) for c in columns}
        assert rows[0].progress_at >= rows[0].created_at and rows[0].dispatch_count == 0
        subs = [session.execute(select(SubTask.index, SubTask.status, SubTask.inputs, SubTask.items, SubTask.attempts,
                                       SubTask.worker, SubTask.result_key, SubTask.seconds)
                                .where(SubTask.task_id == row.id).order_by(SubTask.index)).all() for row in rows]
        assert subs[0] == subs[1]
        assert [s.inputs for s in subs[0]] == [texts[0:2], texts[2:4], texts[4:]]  # 7 at 3: even sizes
        assert [(s.index, s.items, s.status, s.attempts) for s in subs[0]] == [
            (0, 2, "Pending", 0), (1, 2, "Pending", 0), (2, 3, "Pending", 0)]
        ids = session.scalars(select(SubTask.id).where(SubTask.task_id.in_([r.id for r in rows]))).all()
        assert len(set(ids)) == 6
    finally:
        session.close()


def test_list_pages_with_an_opaque_cursor_and_filters_by_status(client, user):  # type: ignore[no-untyped-def]
    ids = [client.post("/v1/tasks", json={**WAITING, "inputs": [f"t{i}"]}, headers=user["headers"]).get_json()["id"]
           for i in range(5)]
    cancelled = ids[1]
    assert client.post(f"/v1/tasks/{cancelled}/cancel", headers=user["headers"]).status_code == 202
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        q = "/v1/tasks?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(q, headers=user["headers"]).get_json()
        pages += 1
        seen += [t["id"] for t in page["tasks"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == list(reversed(ids))  # newest first, nothing twice, nothing missed
    only = client.get("/v1/tasks?status=Cancelled", headers=user["headers"]).get_json()
    assert [t["id"] for t in only["tasks"]] == [cancelled] and only["next_cursor"] is None
    assert only["tasks"][0]["status"] == "Cancelled" and "progress" in only["tasks"][0]
    created = client.get("/v1/tasks?status=Created&limit=100", headers=user["headers"]).get_json()["tasks"]
    assert {t["id"] for t in created} == set(ids) - {cancelled}


def test_cancel_active_task_is_202_idempotent_and_releases_the_hold(client, user):  # type: ignore[no-untyped-def]
    before = client.get("/v1/me", headers=user["headers"]).get_json()
    task = client.post("/v1/tasks", json=WAITING, headers=user["headers"]).get_json()
    held = client.get("/v1/me", headers=user["headers"]).get_json()
    assert float(held["available_balance"]) < float(before["available_balance"])
    resp = client.post(f"/v1/tasks/{task['id']}/cancel", headers=user["headers"])
    assert resp.status_code == 202
    doc = resp.get_json()
    assert doc["status"] == "Cancelled" and doc["finished_at"] and doc["error"]
    again = client.post(f"/v1/tasks/{task['id']}/cancel", headers=user["headers"])
    assert again.status_code == 202 and again.get_json()["status"] == "Cancelled"
    after = client.get("/v1/me", headers=user["headers"]).get_json()
    assert after["available_balance"] == before["available_balance"]  # nothing ran, nothing charged
    assert client.get(f"/v1/tasks/{task['id']}/result", headers=user["headers"]).status_code == 409


def test_cancel_of_a_running_task_stops_its_remaining_subtasks(client, user, worker):  # type: ignore[no-untyped-def]
    import time

    task = client.post("/v1/tasks", json={"model": "echo", "inputs": list(range(400)), "batch_size": 1},
                       headers=user["headers"]).get_json()
    deadline = time.monotonic() + 60
    while client.get(f"/v1/tasks/{task['id']}", headers=user["headers"]).get_json()["status"] == "Created":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client.post(f"/v1/tasks/{task['id']}/cancel", headers=user["headers"]).status_code == 202
    doc = wait_for_task(client, user["headers"], task["id"])
    assert doc["status"] == "Cancelled"
    time.sleep(3)  # let the queued subtasks drain: each sees the final task and skips
    subs = client.get(f"/v1/tasks/{task['id']}/subtasks", headers=user["headers"]).get_json()["subtasks"]
    assert sum(s["status"] == "Done" for s in subs) < 400
    assert client.get(f"/v1/tasks/{task['id']}", headers=user["headers"]).get_json()["status"] == "Cancelled"


def test_partial_result_at_any_status(client, user, worker):  # type: ignore[no-untyped-def]
    """`partial=true`: a waiting task's outputs are all null and every subtask is missing; a Done
    task's are its result, complete. Without it a task that is not Done is 409, as before."""
    waiting = client.post("/v1/tasks", json={**WAITING, "inputs": ["x", "y", "z"], "batch_size": 2},
                          headers=user["headers"]).get_json()
    try:
        assert client.get(f"/v1/tasks/{waiting['id']}/result", headers=user["headers"]).status_code == 409
        doc = client.get(f"/v1/tasks/{waiting['id']}/result?partial=true", headers=user["headers"]).get_json()
        assert doc["outputs"] == [None, None, None] and doc["complete"] is False and doc["status"] == "Created"
        assert [(m["index"], m["first_item"], m["items"], m["status"], m["error"]) for m in doc["missing"]] == [
            (0, 0, 1, "Pending", None), (1, 1, 2, "Pending", None)]
    finally:
        client.post(f"/v1/tasks/{waiting['id']}/cancel", headers=user["headers"])
    done = client.post("/v1/tasks", json={"model": "echo", "inputs": [1, {"a": "ü"}, None]},
                       headers=user["headers"]).get_json()
    assert wait_for_task(client, user["headers"], done["id"])["status"] == "Done"
    full = client.get(f"/v1/tasks/{done['id']}/result", headers=user["headers"]).get_json()
    doc = client.get(f"/v1/tasks/{done['id']}/result?partial=1", headers=user["headers"]).get_json()
    assert doc == {**full, "status": "Done", "complete": True, "missing": []}
    bad = client.get(f"/v1/tasks/{done['id']}/result?partial=maybe", headers=user["headers"])
    assert bad.status_code == 422 and bad.get_json()["errors"][0]["field"] == "partial"


def test_cancel_of_a_finished_task_is_409(client, user, worker):  # type: ignore[no-untyped-def]
    task = client.post("/v1/tasks", json={"model": "echo", "inputs": [1, 2]}, headers=user["headers"]).get_json()
    assert wait_for_task(client, user["headers"], task["id"])["status"] == "Done"
    resp = client.post(f"/v1/tasks/{task['id']}/cancel", headers=user["headers"])
    assert resp.status_code == 409 and resp.get_json()["task_status"] == "Done"


def test_another_users_task_is_404_everywhere(client, user, other, worker):  # type: ignore[no-untyped-def]
    task = client.post("/v1/tasks", json={"model": "echo", "inputs": ["mine"]}, headers=user["headers"]).get_json()
    assert wait_for_task(client, user["headers"], task["id"])["status"] == "Done"
    for method, path in (("get", ""), ("get", "/subtasks"), ("get", "/result"), ("post", "/cancel")):
        resp = getattr(client, method)(f"/v1/tasks/{task['id']}{path}", headers=other["headers"])
        assert resp.status_code == 404, (path, resp.get_json())
        assert resp.content_type == "application/problem+json"
    assert client.get("/v1/tasks", headers=other["headers"]).get_json()["tasks"] == []
    # the owner still sees it, still Done
    assert client.get(f"/v1/tasks/{task['id']}/result", headers=user["headers"]).get_json()["outputs"] == ["mine"]


@pytest.mark.parametrize(("device", "batch_size", "subtasks"), [
    ("gpu", None, 2),   # the catalog's gpu_batch_size: 256 sentences per subtask
    ("cpu", None, 5),   # batch_size: 64
    ("any", None, 5),   # no GPU node is live: the CPU-safe size
    ("gpu", 100, 3),    # the request's own size wins
])
def test_a_gpu_job_is_cut_into_gpu_sized_subtasks(client, user, device, batch_size, subtasks):  # type: ignore[no-untyped-def]
    body = {"model": "embedding", "inputs": [f"sentence {i}" for i in range(300)], "device": device}
    if batch_size:
        body["batch_size"] = batch_size
    resp = client.post("/v1/tasks", json=body, headers=user["headers"])
    assert resp.status_code == 202, resp.get_json()
    assert resp.get_json()["subtasks"] == subtasks


def test_a_job_is_cut_into_subtasks_of_even_sizes(client, user):  # type: ignore[no-untyped-def]
    """ceil(n / batch_size) subtasks whose sizes differ by at most one, in input order: parallel
    lanes end together instead of one idling through the other's last full subtask."""
    inputs = list(range(251))
    task = client.post("/v1/tasks", json={"model": "echo", "inputs": inputs, "batch_size": 100},
                       headers=user["headers"]).get_json()
    try:
        subs = client.get(f"/v1/tasks/{task['id']}/subtasks", headers=user["headers"]).get_json()["subtasks"]
        assert [(s["index"], s["items"]) for s in subs] == [(0, 83), (1, 84), (2, 84)]
    finally:
        client.post(f"/v1/tasks/{task['id']}/cancel", headers=user["headers"])


def test_subtasks_page_in_index_order(client, user):  # type: ignore[no-untyped-def]
    task = client.post("/v1/tasks", json={**WAITING, "inputs": list("abcde"), "batch_size": 1},
                       headers=user["headers"]).get_json()
    url = f"/v1/tasks/{task['id']}/subtasks"
    try:
        def page(query: str):  # type: ignore[no-untyped-def]
            doc = client.get(url + query, headers=user["headers"]).get_json()
            return [s["index"] for s in doc["subtasks"]], doc["next_after"]

        assert page("") == ([0, 1, 2, 3, 4], None)  # unpaged, as before
        assert page("?limit=2") == ([0, 1], 1)
        assert page("?limit=2&after=1") == ([2, 3], 3)
        assert page("?limit=2&after=3") == ([4], None)
        assert page("?status=Pending&after=2") == ([3, 4], None)
        assert page("?status=Done") == ([], None)
        for bad, field in (("?limit=0", "limit"), ("?limit=1001", "limit"), ("?status=Sleeping", "status"),
                           ("?after=-2", "after"), ("?page=2", "page")):
            resp = client.get(url + bad, headers=user["headers"])
            assert resp.status_code == 422 and resp.get_json()["errors"][0]["field"] == field, (bad, resp.get_json())
    finally:
        client.post(f"/v1/tasks/{task['id']}/cancel", headers=user["headers"])


def test_an_any_device_job_is_cut_for_the_gpu_node_that_will_run_it(client, user, redis_client):  # type: ignore[no-untyped-def]
    """`any` goes to a GPU when one is live: its subtasks get the GPU batch size then."""
    from marketplace.registry.service import deregister, heartbeat

    hostname = f"gpu-node-{uuid.uuid4().hex[:6]}@test"
    heartbeat(redis_client, info={"hostname": hostname, "queues": ["gpu.embedding"], "concurrency": 1})
    resp = None
    try:
        body = {"model": "embedding", "inputs": [f"sentence {i}" for i in range(300)], "device": "any"}
        resp = client.post("/v1/tasks", json=body, headers=user["headers"])
        assert resp.status_code == 202, resp.get_json()
        assert resp.get_json()["subtasks"] == 2  # 150 + 150 (at most 256 each), not five of 64
    finally:
        deregister(redis_client, hostname=hostname)
        if resp is not None and resp.status_code == 202:  # no node will run it
            client.post(f"/v1/tasks/{resp.get_json()['id']}/cancel", headers=user["headers"])


def test_a_catalog_batch_size_above_the_maximum_is_refused() -> None:
    from pydantic import ValidationError

    from marketplace.catalog import parse_catalog

    model = {"input": "text", "devices": ["gpu", "cpu"], "batch_size": 8, "max_batch_size": 64, "time_limit": 60,
             "price": {"gpu": {"start_fee": "0", "per_second": "0", "per_item": "0"}}}
    assert parse_catalog({"models": {"m": {**model, "gpu_batch_size": 64}}}).get("m").default_batch_size("gpu") == 64
    with pytest.raises(ValidationError, match="above max_batch_size"):
        parse_catalog({"models": {"m": {**model, "gpu_batch_size": 65}}})

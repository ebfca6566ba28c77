"""The fair dispatcher with real workers, PostgreSQL and Redis: who runs first, caps, cancel, and a
broker that never holds a job's backlog.

Each test runs on a database and a broker of its own: tasks other tests left active would be
other users of the same queues, and take their fair turns.
"""
from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import text

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
def node(market) -> Iterator:  # type: ignore[no-untyped-def]
    """Start one node (control queues and cpu.generic) when the test is ready for it."""
    from marketplace.infra.redis_client import get_redis

    started: list[CeleryWorker] = []

    def start(concurrency: int = 1, **env: str) -> CeleryWorker:
        worker = CeleryWorker(CONTROL + ["cpu.generic"], name=f"fair-{uuid.uuid4().hex[:6]}",
                              concurrency=concurrency, env=env or None)
        started.append(worker)
        worker.wait_ready(get_redis())
        return worker

    yield start
    for worker in started:
        worker.stop()


def _submit(client, user, n: int, **params) -> str:  # type: ignore[no-untyped-def]
    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": list(range(n)), "batch_size": 1,
                                          "params": params}, headers=user["headers"])
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()["id"]


def _db(sql: str, **params):  # type: ignore[no-untyped-def]
    from marketplace.infra.db import get_engine

    with get_engine().connect() as conn:
        return conn.execute(text(sql), params).all()


def _start_order(task_ids: dict[str, str]) -> list[str]:
    """Whose subtask started, in start order (first attempts: nothing here is retried)."""
    owner = {tid: name for name, tid in task_ids.items()}
    rows = _db("SELECT task_id FROM subtasks WHERE task_id = ANY(CAST(:ids AS uuid[])) ORDER BY started_at",
               ids=list(owner))
    return [owner[str(r.task_id)] for r in rows]


def _set_user(user: dict, **fields) -> None:  # type: ignore[no-untyped-def]
    from marketplace.infra.db import session_scope
    from marketplace.users.service import update_user

    with session_scope() as session:
        update_user(session, email=user["email"], actor="operator:test", changes=fields)


def test_two_users_with_equal_shares_take_turns_on_the_slot(client, node):  # type: ignore[no-untyped-def]
    a, b = register(client), register(client)
    # Both jobs wait before any node runs: the node's first scheduling steps find them both.
    jobs = {"a": _submit(client, a, 12, sleep_s=0.2), "b": _submit(client, b, 12, sleep_s=0.2)}
    node(concurrency=1)
    for user, task_id in ((a, jobs["a"]), (b, jobs["b"])):
        assert wait_for_task(client, user["headers"], task_id, timeout=90)["status"] == "Done"
    order = _start_order(jobs)
    first = order[:16]
    assert 6 <= first.count("a") <= 10, order  # 8 each, give or take the first release
    longest = max(len(run) for run in "".join(first).replace("ab", "a b").replace("ba", "b a").split())
    assert longest <= 3, order


def test_three_users_get_slots_in_proportion_to_their_shares(client, node):  # type: ignore[no-untyped-def]
    a, b, c = register(client), register(client), register(client)
    _set_user(a, share=2.0)
    jobs = {"a": _submit(client, a, 20, sleep_s=0.2), "b": _submit(client, b, 12, sleep_s=0.2),
            "c": _submit(client, c, 12, sleep_s=0.2)}
    node(concurrency=1)
    for user, task_id in ((a, jobs["a"]), (b, jobs["b"]), (c, jobs["c"])):
        assert wait_for_task(client, user["headers"], task_id, timeout=120)["status"] == "Done"
    first = _start_order(jobs)[:20]
    # Shares 2:1:1 of 20 slot-runs of equal length: 10, 5 and 5.
    assert 8 <= first.count("a") <= 12 and 3 <= first.count("b") <= 7 and 3 <= first.count("c") <= 7, first


def test_a_user_at_max_running_subtasks_never_has_more_in_flight(client, node):  # type: ignore[no-untyped-def]
    """Capped at one, the user's job runs one subtask at a time on a node of two free slots."""
    user = register(client)
    _set_user(user, max_running_subtasks=1)
    me = client.get("/v1/me", headers=user["headers"]).get_json()
    assert me["quotas"]["max_running_subtasks"] == 1 and me["quotas"]["share"] == 1.0
    task_id = _submit(client, user, 5, sleep_s=0.4)
    node(concurrency=2)
    most = 0
    while (doc := client.get(f"/v1/tasks/{task_id}", headers=user["headers"]).get_json())["status"] not in (
            "Done", "Failed"):
        (row,) = _db("SELECT count(*) AS n FROM subtasks WHERE task_id = :t AND status = 'Running'", t=task_id)
        most = max(most, row.n)
        time.sleep(0.05)
    assert doc["status"] == "Done" and most == 1, (doc, most)
    starts = _db("SELECT started_at, finished_at FROM subtasks WHERE task_id = :t ORDER BY started_at", t=task_id)
    assert all(later.started_at >= earlier.finished_at for earlier, later in zip(starts, starts[1:], strict=False))


def test_a_waiting_task_says_why_and_where(client, node):  # type: ignore[no-untyped-def]
    a, b = register(client), register(client)
    node(concurrency=1)
    big = _submit(client, a, 30, sleep_s=0.3)
    wait_until(lambda: _db("SELECT count(*) AS n FROM subtasks WHERE task_id = :t AND status = 'Running'",
                           t=big)[0].n == 1, 30, "the big job running")
    second = _submit(client, a, 3, sleep_s=0.1)  # the same user's: behind its first job
    doc = wait_until(lambda: (d := client.get(f"/v1/tasks/{second}", headers=a["headers"]).get_json())
                     .get("queue_position") is not None and d, 30, "the second job waiting for a slot")
    assert doc["status"] == "Scheduled" and doc["status_reason"].startswith("waiting for a cpu.generic slot: ")
    assert doc["queue_position"] >= 20, doc  # its own first job's backlog goes first
    newcomer = _submit(client, b, 1)  # another user's: next, whatever waits
    assert wait_for_task(client, b["headers"], newcomer, timeout=30)["status"] == "Done"
    still = client.get(f"/v1/tasks/{big}", headers=a["headers"]).get_json()
    assert still["status"] == "InProgress", "the newcomer did not wait for the big job"
    for task_id in (big, second):
        client.post(f"/v1/tasks/{task_id}/cancel", headers=a["headers"])


def _sandbox_processes(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if marker.encode() in fh.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not os.path.exists("/usr/bin/bwrap"), reason="bubblewrap is installed by `make test`")
def test_cancel_kills_a_running_sandbox_within_two_seconds_and_frees_its_slot(client, node):  # type: ignore[no-untyped-def]
    """The command's processes are gone, the subtask ends Cancelled with a charge for the time it
    ran, what had not started is Cancelled, and the node's slot runs another user's job."""
    user, other = register(client), register(client)
    node(concurrency=1, MARKETPLACE_SANDBOX="bwrap")
    marker = f"marker-{uuid.uuid4().hex}"
    resp = client.post("/v1/tasks", json={
        "model": "generic", "inputs": [1, 2, 3], "batch_size": 1,
        "params": {"command": ["python3", "-c", f"import sys, time  # {marker}\nfor l in sys.stdin: time.sleep(120)"],
                   "timeout_s": 300}}, headers=user["headers"])
    task_id = resp.get_json()["id"]
    wait_until(lambda: _sandbox_processes(marker), 60, "the command running in its sandbox")
    cancelled_at = time.monotonic()
    assert client.post(f"/v1/tasks/{task_id}/cancel", headers=user["headers"]).status_code == 202
    wait_until(lambda: not _sandbox_processes(marker), 10, "the sandbox's processes gone")
    assert time.monotonic() - cancelled_at <= 2.5, "killed within 2 s (plus this test's polling)"
    wait_until(lambda: not _db("SELECT 1 FROM subtasks WHERE task_id = :t AND status IN ('Pending', 'Running')",
                               t=task_id), 10, "no subtask of the cancelled task left open")
    subs = _db("SELECT index, status, seconds FROM subtasks WHERE task_id = :t ORDER BY index", t=task_id)
    assert [s.status for s in subs] == ["Cancelled"] * 3, subs
    ran = [s for s in subs if s.seconds]
    assert len(ran) == 1 and 0 < ran[0].seconds < 10, subs
    charges = _db("SELECT kind, amount, detail FROM ledger_entries WHERE task_id = :t", t=task_id)
    assert len(charges) == 1 and charges[0].kind == "charge_failed" and "stopped" in charges[0].detail, charges
    # The slot is free: another user's job runs now.
    follow = _submit(client, other, 1)
    assert wait_for_task(client, other["headers"], follow, timeout=20)["status"] == "Done"
    doc = client.get(f"/v1/tasks/{task_id}", headers=user["headers"]).get_json()
    assert doc["status"] == "Cancelled" and doc["cost"] == str(-charges[0].amount), doc


def test_a_ten_thousand_subtask_backlog_keeps_the_broker_queue_short(client, market):  # type: ignore[no-untyped-def]
    """A node of two slots that takes nothing (a heartbeat with no process behind it): whatever is
    queued, the broker holds the slots plus a short window, and every release keeps it there."""
    from marketplace.infra.broker import queue_depths
    from marketplace.infra.redis_client import get_redis
    from marketplace.registry.service import heartbeat
    from marketplace.scheduling.dispatch import release_all
    from marketplace.scheduling.service import schedule_task

    heartbeat(get_redis(), info={"hostname": "still@test", "queues": ["cpu.generic"], "concurrency": 2})
    users = [register(client) for _ in range(3)]
    jobs = [_submit(client, users[0], 10_000), _submit(client, users[1], 500), _submit(client, users[2], 500)]
    for task_id in jobs:
        assert schedule_task(task_id).status == "scheduled"
    depth = queue_depths(["cpu.generic"])["cpu.generic"]
    # Two slots, plus a window of about 0.25 s of work per slot (1 s each, as none has run yet).
    assert 1 <= depth <= 4, depth
    for _ in range(5):
        release_all()
    assert queue_depths(["cpu.generic"])["cpu.generic"] == depth
    (backlog,) = _db("SELECT sum(backlog) AS n FROM tasks WHERE id = ANY(CAST(:ids AS uuid[]))", ids=jobs)
    assert backlog.n == 11_000 - depth



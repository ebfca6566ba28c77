"""A node restarted under its own name (a standalone's worker, a container restarted in place):
what its killed predecessor left Running is known dead at once and taken over, not skipped as
"running on" the new node until the subtask's time limit."""
from __future__ import annotations

import json
import os
import signal
import time
import uuid

import psutil
import pytest
from sqlalchemy import text

from marketplace.catalog import CONTROL_QUEUES
from tests.support.api import register, wait_for_task
from tests.support.servers import CeleryWorker
from tests.support.wait import wait_until

CONTROL = list(CONTROL_QUEUES)
RESUMES_WITHIN = 120.0  # README: "a job whose node died resumes about two minutes later"


def _db(sql: str, **params):  # type: ignore[no-untyped-def]
    from marketplace.infra.db import get_engine

    with get_engine().connect() as conn:
        return conn.execute(text(sql), params).all()


def _db_exec(sql: str, **params) -> None:  # type: ignore[no-untyped-def]
    from marketplace.infra.db import get_engine

    with get_engine().begin() as conn:
        conn.execute(text(sql), params)


def _names(*letters: str) -> list[str]:
    """Node names of this test alone: the database is shared, and recovery looks at every task."""
    run = uuid.uuid4().hex[:6]
    return [f"node-{letter}-{run}@test" for letter in letters]


def _heartbeat(hostname: str, incarnation: str | None) -> None:
    from marketplace.infra.redis_client import get_redis
    from marketplace.registry.service import heartbeat

    info = {"hostname": hostname, "queues": ["cpu.generic"], "concurrency": 1}
    heartbeat(get_redis(), info={**info, "incarnation": incarnation} if incarnation else info)


@pytest.fixture()
def stored_task(client):  # type: ignore[no-untyped-def]
    """make(n) -> (task id, subtask ids, user): an echo task no worker consumes (own broker, no
    node), Scheduled on cpu.generic and just moved. Its rows are made up (claims by nodes that do
    not exist): the task ends Cancelled, so that no later test's recovery in the shared database
    sends or finalizes it."""
    from marketplace.infra.db import get_engine

    made: list[str] = []

    def make(n: int) -> tuple[str, list[str], dict]:
        user = register(client)
        resp = client.post("/v1/tasks", json={"model": "echo", "inputs": list(range(n)), "batch_size": 1},
                           headers=user["headers"])
        task_id = resp.get_json()["id"]
        made.append(task_id)
        with get_engine().begin() as conn:
            conn.execute(text("UPDATE tasks SET status = 'Scheduled', queue = 'cpu.generic', dispatch_count = 1, "
                              "progress_at = now() WHERE id = :t"), {"t": task_id})
            # Sent once, as the fair dispatcher would have: recovery and Reschedule judge what was sent.
            conn.execute(text("UPDATE subtasks SET dispatches = 1 WHERE task_id = :t"), {"t": task_id})
            ids = [str(r.id) for r in conn.execute(
                text("SELECT id FROM subtasks WHERE task_id = :t ORDER BY index"), {"t": task_id})]
        return task_id, ids, user

    yield make
    _db_exec("UPDATE tasks SET status = 'Cancelled', finished_at = now() WHERE id::text = ANY(:ids)", ids=made)


def _claim(sid: str, hostname: str, incarnation: str | None, message: int):  # type: ignore[no-untyped-def]
    from marketplace.tasks.lifecycle import claim

    return claim(sid, node=hostname, message_id=f"{sid}:{message}", incarnation=incarnation)


def _queued_ids(queue: str = "cpu.generic") -> list[str]:
    from marketplace.infra.broker import broker_lists
    from marketplace.infra.celery_app import app
    from marketplace.infra.redis_client import get_redis

    ids = []
    for name in broker_lists(queue, dict(app.conf.broker_transport_options)):
        for raw in get_redis().lrange(name, 0, -1):
            ids.append((json.loads(raw).get("headers") or {}).get("id"))
    return ids


# -- the claim ------------------------------------------------------------------------------------

def test_a_copy_takes_over_at_once_from_the_predecessor_of_a_restarted_node(stored_task, own_broker):  # type: ignore[no-untyped-def]
    node_a, node_b = _names("a", "b")
    _task, (sid,), _ = stored_task(1)
    _heartbeat(node_a, "first")
    early, work = _claim(sid, node_a, "first", 1)
    assert early is None and work.attempts == 1
    early, _ = _claim(sid, node_b, "b", 2)
    assert early is not None and early["skipped"] and node_a in early["error"], "node-a's process runs it"

    _heartbeat(node_a, "second")  # node-a restarted: same name, a new process
    early, work = _claim(sid, node_b, "b", 3)  # at once: no stall deadline, no time limit
    assert early is None and work.attempts == 2, early
    row = _db("SELECT status, worker, worker_incarnation FROM subtasks WHERE id = :s", s=sid)[0]
    assert (row.status, row.worker, row.worker_incarnation) == ("Running", node_b, "b")


def test_a_restarted_node_takes_over_its_predecessors_claim_before_its_own_heartbeat_is_written(stored_task, own_broker):  # type: ignore[no-untyped-def]
    """A new node's first messages may come before its heartbeat replaces its predecessor's
    record: a claim by another process of its own name is still known dead."""
    node_a = _names("a")[0]
    _task, (sid,), _ = stored_task(1)
    _heartbeat(node_a, "first")
    assert _claim(sid, node_a, "first", 1)[0] is None
    early, work = _claim(sid, node_a, "second", 2)  # the registry still shows "first"
    assert early is None and work.attempts == 2, early
    early, _ = _claim(sid, node_a, "second", 3)  # and its own run is not taken from it
    assert early is not None and early["skipped"], early


def test_a_claim_without_an_incarnation_is_judged_by_the_node_name_as_before(stored_task, own_broker):  # type: ignore[no-untyped-def]
    """Rows claimed before the migration, or by a node that heartbeats none."""
    node_a, node_b = _names("a", "b")
    _task, (sid,), _ = stored_task(1)
    _heartbeat(node_a, "now")
    assert _claim(sid, node_a, None, 1)[0] is None
    early, _ = _claim(sid, node_b, "b", 2)
    assert early is not None and early["skipped"], "node-a is live: its run is left to it"


# -- recovery and Reschedule ----------------------------------------------------------------------

def test_recovery_sends_a_restarted_nodes_subtasks_again_without_waiting_for_the_stall(stored_task, own_broker):  # type: ignore[no-untyped-def]
    from marketplace.scheduling.recovery import recover_stalled
    from marketplace.settings import get_settings

    node_a, node_c = _names("a", "c")
    assert get_settings().recovery_stall_seconds >= 60  # the default deadline: this task just moved
    task_id, (orphan, busy), _ = stored_task(2)
    _heartbeat(node_a, "first")
    _heartbeat(node_c, "c")
    assert _claim(orphan, node_a, "first", 1)[0] is None
    assert _claim(busy, node_c, "c", 1)[0] is None
    assert task_id not in recover_stalled()["taken_over"], "node-a still runs it"

    _heartbeat(node_a, "second")
    report = recover_stalled()
    assert task_id in report["taken_over"] and task_id not in report["redispatched"], report
    rows = {r.id: r for r in _db("SELECT id::text, status, error FROM subtasks WHERE task_id = :t", t=task_id)}
    assert rows[orphan].status == "Pending" and f"{node_a} restarted" in rows[orphan].error
    assert rows[busy].status == "Running", "node-c's run is its own"
    queued = _queued_ids()
    assert f"{orphan}:2" in queued and not [m for m in queued if m and m.startswith(busy)], queued
    assert task_id not in recover_stalled()["taken_over"], "sent once"


def test_reschedule_answers_only_the_subtasks_it_really_sent(stored_task, own_broker):  # type: ignore[no-untyped-def]
    """gRPC Reschedule answered every open subtask, those a live node runs (whose copies the claim
    skips) included: [0, 1] while nothing ran."""
    import grpc

    from marketplace.pb.scheduler import scheduler_pb2, scheduler_pb2_grpc
    from marketplace.rpc.server import build_server

    node_a, node_c = _names("a", "c")
    task_id, (pending, busy, orphan, gone, done), user = stored_task(5)
    _heartbeat(node_a, "first")
    _heartbeat(node_c, "c")
    for sid, host, inc in ((busy, node_c, "c"), (orphan, node_a, "first"),
                           (gone, "gone@test", "g"), (done, node_c, "c")):
        assert _claim(sid, host, inc, 1)[0] is None
    _heartbeat(node_a, "second")  # restarted; gone@test never heartbeat
    _db_exec("UPDATE subtasks SET status = 'Done' WHERE id = :s", s=done)
    # The owner may re-dispatch a task that has not moved for 30 s (well within echo's time limit).
    _db_exec("UPDATE subtasks SET started_at = now() - interval '40 seconds' WHERE task_id = :t", t=task_id)
    _db_exec("UPDATE tasks SET progress_at = now() - interval '40 seconds' WHERE id = :t", t=task_id)

    server = build_server(host="127.0.0.1", port=0, max_workers=2)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            md = (("authorization", f"Bearer {user['tokens']['access_token']}"),)
            resp = stub.Reschedule(scheduler_pb2.RescheduleRequest(task_id=task_id), metadata=md)
            assert list(resp.redispatched_indexes) == [0, 2, 3], resp
            queued = {m for m in _queued_ids() if m}
            assert {f"{pending}:2", f"{orphan}:2", f"{gone}:2"} <= queued
            assert not [m for m in queued if m.startswith((busy, done))], queued

            for sid in (pending, orphan, gone):  # now all of them run on node-c
                assert _claim(sid, node_c, "c", 2)[0] is None
            _db_exec("UPDATE subtasks SET started_at = now() - interval '40 seconds' WHERE task_id = :t", t=task_id)
            _db_exec("UPDATE tasks SET progress_at = now() - interval '40 seconds' WHERE id = :t", t=task_id)
            resp = stub.Reschedule(scheduler_pb2.RescheduleRequest(task_id=task_id), metadata=md)
            assert list(resp.redispatched_indexes) == [], "nothing to send: a live node runs every open one"
            assert _db("SELECT dispatch_count FROM tasks WHERE id = :t", t=task_id)[0].dispatch_count == 2
    finally:
        server.stop(grace=1)


# -- a real node, killed and started again ----------------------------------------------------------

def _record(r, hostname: str) -> dict:  # type: ignore[no-untyped-def]
    raw = r.get(f"marketplace:worker:{hostname}")
    return json.loads(raw) if raw else {}


@pytest.mark.slow
def test_a_node_whose_main_process_is_killed_and_restarted_under_its_name_finishes_the_job(client, own_broker):  # type: ignore[no-untyped-def]
    from marketplace.infra.redis_client import get_redis
    from marketplace.settings import get_settings

    assert get_settings().recovery_stall_seconds >= RESUMES_WITHIN, "the default deadline; no recovery is run here"
    r = get_redis()
    name = f"restarted-{uuid.uuid4().hex[:4]}"
    queues = CONTROL + ["cpu.generic"]  # one node for everything, as `marketplace standalone` runs it
    first = CeleryWorker(queues, name=name, concurrency=2)
    second = None
    try:
        first.wait_ready(r)
        first_incarnation = _record(r, first.hostname)["incarnation"]
        user = register(client)
        inputs = [f"x{i}" for i in range(6)]
        resp = client.post("/v1/tasks", json={"model": "echo", "inputs": inputs, "batch_size": 1,
                                              "params": {"sleep_s": 5}}, headers=user["headers"])
        assert resp.status_code == 202, resp.get_json()
        task_id = resp.get_json()["id"]
        running = wait_until(lambda: [r_.id for r_ in _db(
            "SELECT id::text FROM subtasks WHERE task_id = :t AND status = 'Running'", t=task_id)],
            what="a running subtask")
        assert {r_.worker_incarnation for r_ in _db(
            "SELECT worker_incarnation FROM subtasks WHERE id::text = ANY(:ids)", ids=running)} == {first_incarnation}
        children = psutil.Process(first.proc.pid).children()
        assert children, "prefork pool children"

        os.kill(first.proc.pid, signal.SIGKILL)  # the main process only
        killed = time.monotonic()
        first.proc.wait(timeout=10)
        # Celery's pool children die with their main process: nothing runs the claimed subtasks now.
        wait_until(lambda: not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE],
                   timeout=10, what="the pool children to die with their main process")

        second = CeleryWorker(queues, name=name, concurrency=2)  # the same node name
        second.wait_ready(r)
        second_incarnation = _record(r, second.hostname)["incarnation"]
        assert second_incarnation and second_incarnation != first_incarnation

        def taken_over() -> bool:
            rows = _db("SELECT status, worker_incarnation FROM subtasks WHERE id::text = ANY(:ids)", ids=running)
            return all(row.status == "Done" or row.worker_incarnation == second_incarnation for row in rows)

        # At once: well before the stall deadline (120 s) and the subtasks' time limit (60 s + 60 s).
        wait_until(taken_over, timeout=30, what=lambda: f"the new node to take over\n{second.tail()}")
        doc = wait_for_task(client, user["headers"], task_id, timeout=RESUMES_WITHIN - (time.monotonic() - killed))
        assert doc["status"] == "Done", doc

        result = client.get(f"/v1/tasks/{task_id}/result", headers=user["headers"]).get_json()
        assert result["outputs"] == inputs
        subtasks = _db("SELECT id::text, status, attempts, worker_incarnation FROM subtasks WHERE task_id = :t",
                       t=task_id)
        assert {s.status for s in subtasks} == {"Done"}
        assert {s.attempts for s in subtasks if s.id in running} == {2}, "the killed run, then the new node's"
        charges = _db("SELECT subtask_id::text FROM ledger_entries WHERE task_id = :t AND kind = 'charge'", t=task_id)
        assert sorted(c.subtask_id for c in charges) == sorted(s.id for s in subtasks), "one charge per subtask"
        cost = _db("SELECT cost FROM tasks WHERE id = :t", t=task_id)[0].cost
        total = _db("SELECT -SUM(amount) AS s FROM ledger_entries WHERE task_id = :t", t=task_id)[0].s
        assert cost == total and cost > 0
        assert [h.status for h in _db("SELECT status FROM holds WHERE task_id = :t", t=task_id)] == ["released"]
    finally:
        for node in (first, second):
            if node is not None:
                node.stop()

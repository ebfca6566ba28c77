"""Real processes die mid-job; the job still ends Done, every output once, one charge per subtask."""
from __future__ import annotations

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

CONTROL = list(CONTROL_QUEUES)  # the catalog names the control queues
pytestmark = pytest.mark.slow


def _db(sql: str, **params):  # type: ignore[no-untyped-def]
    from marketplace.infra.db import get_engine

    with get_engine().connect() as conn:
        return conn.execute(text(sql), params).all()


def _running(task_id: str) -> list[tuple[int, str]]:
    return [(r.index, r.worker) for r in _db(
        "SELECT index, worker FROM subtasks WHERE task_id = :t AND status = 'Running'", t=task_id)]


def _assert_exactly_once(client, user, task_id: str, inputs: list) -> None:  # type: ignore[no-untyped-def]
    result = client.get(f"/v1/tasks/{task_id}/result", headers=user["headers"]).get_json()
    assert result["outputs"] == inputs
    subtasks = _db("SELECT id, status FROM subtasks WHERE task_id = :t", t=task_id)
    assert {s.status for s in subtasks} == {"Done"}
    charges = _db("SELECT subtask_id FROM ledger_entries WHERE task_id = :t AND kind = 'charge'", t=task_id)
    assert sorted(str(c.subtask_id) for c in charges) == sorted(str(s.id) for s in subtasks), "one charge per subtask"
    cost = _db("SELECT cost FROM tasks WHERE id = :t", t=task_id)[0].cost
    total = _db("SELECT -SUM(amount) AS s FROM ledger_entries WHERE task_id = :t", t=task_id)[0].s
    assert cost == total
    holds = _db("SELECT status FROM holds WHERE task_id = :t", t=task_id)
    assert [h.status for h in holds] == ["released"]


def _drive_recovery(client, user, task_id: str, timeout: float = 120.0) -> dict:  # type: ignore[no-untyped-def]
    """Run beat's two jobs that push work on, recovery (every 30 s there) and the release of
    queued work (every 2 s), until the task is final. The release matters where the broker lost
    the nodes' heartbeats too: outcomes recorded before a node's next heartbeat find the queue
    without capacity and release nothing, and only the periodic release sends the rest."""
    from marketplace.scheduling.dispatch import release_all
    from marketplace.scheduling.recovery import recover_stalled

    deadline = time.monotonic() + timeout
    while True:
        doc = client.get(f"/v1/tasks/{task_id}", headers=user["headers"]).get_json()
        if doc["status"] in ("Done", "Failed") or time.monotonic() > deadline:
            return doc
        recover_stalled()
        release_all()
        time.sleep(1)


def _submit(client, user, body: dict) -> str:  # type: ignore[no-untyped-def]
    resp = client.post("/v1/tasks", json=body, headers=user["headers"])
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()["id"]


def _start(queues: list[str], name: str, redis_client) -> CeleryWorker:  # type: ignore[no-untyped-def]
    node = CeleryWorker(queues, name=f"{name}-{uuid.uuid4().hex[:4]}", concurrency=2)
    node.wait_ready(redis_client)
    return node


def test_sigkill_of_a_pool_child_mid_subtask_is_redelivered_and_charged_once(client, own_broker):  # type: ignore[no-untyped-def]
    from marketplace.infra.redis_client import get_redis

    node = _start(CONTROL + ["cpu.generic"], "child-kill", get_redis())
    try:
        user = register(client)
        inputs = list(range(8))
        task_id = _submit(client, user, {"model": "echo", "inputs": inputs, "batch_size": 1,
                                                 "params": {"sleep_s": 0.8}})
        wait_until(lambda: _running(task_id), what="a running subtask")
        children = psutil.Process(node.proc.pid).children()
        assert children, "prefork pool children"
        os.kill(children[0].pid, signal.SIGKILL)
        doc = wait_for_task(client, user["headers"], task_id, timeout=120)
        assert doc["status"] == "Done", doc
        _assert_exactly_once(client, user, task_id, inputs)
    finally:
        node.stop()


def test_a_whole_node_killed_mid_job_is_recovered_from_the_database(client, own_broker, monkeypatch):  # type: ignore[no-untyped-def]
    from marketplace.infra.redis_client import get_redis
    from marketplace.settings import get_settings

    monkeypatch.setattr(get_settings(), "recovery_stall_seconds", 2.0)
    r = get_redis()
    control = _start(CONTROL, "control", r)
    doomed = _start(["cpu.generic"], "doomed", r)
    survivor = None
    try:
        user = register(client)
        inputs = [f"x{i}" for i in range(6)]
        task_id = _submit(client, user, {"model": "echo", "inputs": inputs, "batch_size": 1,
                                                 "params": {"sleep_s": 1.5}})
        wait_until(lambda: _running(task_id), what="a running subtask on the doomed node")
        doomed.stop(signal.SIGKILL)  # the whole process group: main process and pool
        # Its heartbeat expires (the TTL, cut short here): an operator running recover at once is
        # told what waits for the deadline and how not to wait.
        r.delete(f"marketplace:worker:{doomed.hostname}")
        from click.testing import CliRunner

        from marketplace.cli.main import main

        out = CliRunner().invoke(main, ["recover", "--stall-seconds", "3600"])
        assert out.exit_code == 0 and "redispatched: 0" in out.output, out.output
        from marketplace.scheduling.recovery import not_yet_stalled_on_dead_nodes

        assert task_id in not_yet_stalled_on_dead_nodes()  # the CLI prints ten ids; the shared database has others
        assert "waiting on a dead node: " in out.output and "--stall-seconds 0" in out.output, out.output
        assert CliRunner().invoke(main, ["recover", "--stall-seconds", "-5"]).exit_code == 2
        monkeypatch.setattr(get_settings(), "recovery_stall_seconds", 2.0)  # the CLI set it to 3600
        survivor = _start(["cpu.generic"], "survivor", r)
        doc = _drive_recovery(client, user, task_id)
        assert doc["status"] == "Done", doc
        _assert_exactly_once(client, user, task_id, inputs)
        assert any(w and w.startswith("survivor") for _, w in
                   [(r_.index, r_.worker) for r_ in _db("SELECT index, worker FROM subtasks WHERE task_id = :t", t=task_id)])
    finally:
        for node in (control, doomed, survivor):
            if node is not None:
                node.stop()


def test_redis_flushed_mid_job_still_ends_done(client, own_broker, monkeypatch):  # type: ignore[no-untyped-def]
    from marketplace.infra.redis_client import get_redis
    from marketplace.settings import get_settings

    monkeypatch.setattr(get_settings(), "recovery_stall_seconds", 2.0)
    r = get_redis()
    node = _start(CONTROL + ["cpu.generic"], "flush", r)
    try:
        user = register(client)
        inputs = list(range(10))
        task_id = _submit(client, user, {"model": "echo", "inputs": inputs, "batch_size": 1,
                                                 "params": {"sleep_s": 0.5}})
        wait_until(lambda: _db("SELECT 1 FROM subtasks WHERE task_id = :t AND status = 'Done'", t=task_id),
              what="a finished subtask")
        r.flushall()  # queues, unacked messages, chord counters, heartbeats, bindings: all gone
        doc = _drive_recovery(client, user, task_id)
        assert doc["status"] == "Done", doc
        _assert_exactly_once(client, user, task_id, inputs)
    finally:
        node.stop()


def test_a_failing_subtask_ends_the_task_without_waiting_for_its_siblings(client, own_broker):  # type: ignore[no-untyped-def]
    from marketplace.infra.redis_client import get_redis

    node = _start(CONTROL + ["cpu.generic"], "shortcut", get_redis())
    try:
        user = register(client)
        inputs = ["boom"] + [f"slow{i}" for i in range(23)]
        started = time.monotonic()
        task_id = _submit(client, user, {
            "model": "echo", "inputs": inputs, "batch_size": 1,
            "params": {"sleep_s": 1.0, "fail_items": ["boom"]},
        })
        doc = wait_for_task(client, user["headers"], task_id, timeout=60)
        elapsed = time.monotonic() - started
        assert doc["status"] == "Failed" and "boom" in doc["error"]
        # 23 one-second siblings on 2 processes would need ~12 s; the task ended well before
        # (its retries queue behind running siblings), and the siblings not yet started never ran.
        assert elapsed < 10, elapsed
        time.sleep(2)
        never_ran = _db("SELECT index FROM subtasks WHERE task_id = :t AND attempts = 0", t=task_id)
        assert len(never_ran) >= 5, never_ran
    finally:
        node.stop()


def test_object_store_unreachable_retries_then_fails_with_the_reason(client, own_broker):  # type: ignore[no-untyped-def]
    from marketplace.infra.redis_client import get_redis
    from marketplace.settings import get_settings
    from tests.support.servers import free_port

    closed = f"http://127.0.0.1:{free_port()}"
    node = CeleryWorker(CONTROL + ["cpu.generic"], name=f"nostore-{uuid.uuid4().hex[:4]}", concurrency=2,
                        env={"MARKETPLACE_S3_ENDPOINT_URL": closed})
    node.wait_ready(get_redis())
    try:
        user = register(client)
        task_id = client.post("/v1/tasks", json={"model": "echo", "inputs": [1, 2], "batch_size": 1},
                              headers=user["headers"]).get_json()["id"]
        doc = wait_for_task(client, user["headers"], task_id, timeout=90)
        assert doc["status"] == "Failed"
        assert "object store" in doc["error"] and "unreachable" in doc["error"], doc["error"]
        attempts = {r.attempts for r in _db("SELECT attempts FROM subtasks WHERE task_id = :t AND status = 'Failed'",
                                            t=task_id)}
        assert attempts == {get_settings().subtask_max_retries + 1}
    finally:
        node.stop()


def test_a_broker_outage_during_dispatch_is_retried_without_waiting_for_recovery(client, own_broker, monkeypatch):  # type: ignore[no-untyped-def]
    """The release's publish meets a stopped broker: it re-sends the job's subtasks itself once the
    broker is back, instead of leaving the task Scheduled for recovery's stall deadline."""
    import threading

    from marketplace.infra.redis_client import get_redis
    from marketplace.scheduling import dispatch, service

    user = register(client)
    inputs = list(range(6))
    task_id = _submit(client, user, {"model": "echo", "inputs": inputs, "batch_size": 1})  # no scheduler runs
    publish, outage = dispatch.publish, []

    def publish_into_an_outage(*args, **kwargs):  # type: ignore[no-untyped-def]
        if not outage:  # the real broker goes down just as the first dispatch starts, back in 2 s
            own_broker.stop()
            outage.append(threading.Timer(2.0, own_broker.start))
            outage[0].start()
        return publish(*args, **kwargs)

    monkeypatch.setattr(dispatch, "publish", publish_into_an_outage)
    node = _start(["cpu.generic", "marketplace.results"], "blip", get_redis())
    try:
        outcome = service.schedule_task(task_id)  # in this process
        outage[0].join()
        assert outcome.status == "scheduled", outcome
        doc = wait_for_task(client, user["headers"], task_id, timeout=60)
        assert doc["status"] == "Done", doc
        _assert_exactly_once(client, user, task_id, inputs)
    finally:
        node.stop()


def _scheduled_by_the_test(client, user, r, body: dict) -> tuple[str, list[str]]:  # type: ignore[no-untyped-def]
    """A submitted task that the test dispatches itself: its scheduling message is dropped."""
    from marketplace.infra.broker import broker_lists
    from marketplace.infra.celery_app import app
    from marketplace.infra.db import get_engine

    task_id = _submit(client, user, body)
    r.delete(*broker_lists("marketplace.scheduler", dict(app.conf.broker_transport_options or {})))
    with get_engine().begin() as conn:
        conn.execute(text("UPDATE tasks SET status = 'Scheduled', queue = 'cpu.generic', dispatch_count = 1 "
                          "WHERE id = :t"), {"t": task_id})
        conn.execute(text("UPDATE subtasks SET dispatches = 1 WHERE task_id = :t"), {"t": task_id})
    return task_id, [str(row.id) for row in _db("SELECT id FROM subtasks WHERE task_id = :t ORDER BY index",
                                                t=task_id)]


def _hung_at_its_hard_limit(client, user, r, inputs: list) -> tuple[str, CeleryWorker]:  # type: ignore[no-untyped-def]
    """A job dispatched with a 1 s limit (hard: 2 s) whose first running subtask's process is
    stopped mid-run: it ignores its soft limit, as a hung C call would, and is killed at the hard one."""
    from marketplace.scheduling.dispatch import publish

    task_id, ids = _scheduled_by_the_test(client, user, r, {"model": "echo", "inputs": inputs, "batch_size": 1,
                                                              "params": {"sleep_s": 0.4}})
    # One pool process: the stopped one is the one running the subtask, and gets nothing else.
    node = CeleryWorker(CONTROL + ["cpu.generic"], name=f"hung-{uuid.uuid4().hex[:4]}", concurrency=1)
    node.wait_ready(r)
    publish(task_id, [f"{sid}:1" for sid in ids], queue="cpu.generic", time_limit=1.0)
    wait_until(lambda: _running(task_id), what="a running subtask")
    (child,) = psutil.Process(node.proc.pid).children()
    os.kill(child.pid, signal.SIGSTOP)
    return task_id, node


def test_a_subtask_killed_at_its_hard_time_limit_is_retried_at_once(client, own_broker):  # type: ignore[no-untyped-def]
    """No recovery sweep runs here: without the errbacks the task would wait for recovery's
    cutoff (the limit plus a minute)."""
    from marketplace.infra.redis_client import get_redis

    user = register(client)
    inputs = list(range(3))
    task_id, node = _hung_at_its_hard_limit(client, user, get_redis(), inputs)
    try:
        doc = wait_for_task(client, user["headers"], task_id, timeout=30)
        assert doc["status"] == "Done", doc
        _assert_exactly_once(client, user, task_id, inputs)
        (killed,) = _db("SELECT attempts FROM subtasks WHERE task_id = :t AND attempts > 1", t=task_id)
        assert killed.attempts == 2
    finally:
        node.stop()


def test_a_subtask_killed_at_its_hard_time_limit_with_no_attempts_left_fails_the_task(client, own_broker):  # type: ignore[no-untyped-def]
    from marketplace.infra.db import get_engine
    from marketplace.infra.redis_client import get_redis
    from marketplace.settings import get_settings

    user = register(client)
    task_id, node = _hung_at_its_hard_limit(client, user, get_redis(), list(range(3)))
    try:
        with get_engine().begin() as conn:
            conn.execute(text("UPDATE subtasks SET attempts = :n WHERE task_id = :t AND status = 'Running'"),
                         {"t": task_id, "n": get_settings().subtask_max_retries + 1})
        doc = wait_for_task(client, user["headers"], task_id, timeout=30)
        assert doc["status"] == "Failed" and "killed at its hard time limit" in doc["error"], doc
        (sub,) = _db("SELECT status, error FROM subtasks WHERE task_id = :t AND status = 'Failed'", t=task_id)
        assert "hard time limit" in sub.error
    finally:
        node.stop()


def test_a_big_job_sent_as_plain_messages_is_finished_by_its_last_subtask(client, own_broker):  # type: ignore[no-untyped-def]
    """No chord calls back: the last subtask to finish asks for finalize, whoever sent the messages."""
    from marketplace.infra import names
    from marketplace.infra.celery_app import app
    from marketplace.infra.redis_client import get_redis
    from workers.runner import INLINE_FINALIZE_MAX_SUBTASKS

    r = get_redis()
    user = register(client)
    inputs = list(range(INLINE_FINALIZE_MAX_SUBTASKS + 4))  # above the inline finalize
    task_id, ids = _scheduled_by_the_test(client, user, r, {"model": "echo", "inputs": inputs, "batch_size": 1})
    # One pool process: two subtasks finishing at once may each see the other open (`was_last`
    # looks again after its commit, but this keeps the test about the message, not that race).
    node = CeleryWorker(["marketplace.results", "cpu.generic"], name=f"no-callback-{uuid.uuid4().hex[:4]}",
                        concurrency=1)
    node.wait_ready(r)
    try:
        for sid in ids:
            app.send_task(names.RUN_SUBTASK, args=[sid], queue="cpu.generic", task_id=f"{sid}:1")
        doc = wait_for_task(client, user["headers"], task_id, timeout=60)
        assert doc["status"] == "Done", doc
        _assert_exactly_once(client, user, task_id, inputs)
    finally:
        node.stop()


def test_a_broker_down_between_the_commit_and_the_schedule_message_still_accepts_and_recovery_runs_it(  # type: ignore[no-untyped-def]
    client, own_broker, monkeypatch,
):
    """The task and its hold are committed when the broker goes away: the submit answers 202
    (a 503 would have the client send a second task), and recovery sends the lost `schedule`
    message once the broker is back. The job ends Done, charged once."""
    from marketplace.infra.redis_client import get_redis
    from marketplace.scheduling import recovery as maintenance
    from marketplace.settings import get_settings
    from marketplace.tasks import service

    user = register(client)
    enqueue = service.enqueue_schedule

    def broker_gone(*args, **kwargs):  # type: ignore[no-untyped-def]
        own_broker.stop()  # the real broker, just after the submit's commit
        return enqueue(*args, **kwargs)

    monkeypatch.setattr(service, "enqueue_schedule", broker_gone)
    inputs = [1, 2, 3]
    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": inputs, "batch_size": 1}, headers=user["headers"])
    assert resp.status_code == 202, resp.get_json()
    task_id = resp.get_json()["id"]
    monkeypatch.setattr(service, "enqueue_schedule", enqueue)
    own_broker.start()
    assert _db("SELECT status FROM tasks WHERE id = :t", t=task_id)[0].status == "Created"

    node = _start(CONTROL + ["cpu.generic"], "after-outage", get_redis())
    try:
        monkeypatch.setattr(get_settings(), "recovery_stall_seconds", 0.0)
        report = maintenance.recover()
        assert task_id in report["rescheduled"], report
        doc = wait_for_task(client, user["headers"], task_id, timeout=60)
        assert doc["status"] == "Done", doc
        _assert_exactly_once(client, user, task_id, inputs)
        assert len(_db("SELECT id FROM tasks WHERE user_id = :u", u=user["id"])) == 1
    finally:
        node.stop()


def _queued(r, queue: str, needle: str) -> bool:  # type: ignore[no-untyped-def]
    """Whether a message naming `needle` waits in `queue` (any of its priority lists)."""
    lists = [k for k in r.scan_iter(match=f"{queue}*") if r.type(k) == b"list"]
    return any(needle.encode() in raw for key in lists for raw in r.lrange(key, 0, -1))


def test_a_webhook_whose_message_redis_lost_is_sent_again_by_recovery_once(client, own_broker, monkeypatch):  # type: ignore[no-untyped-def]
    """The task ends Done and its delivery message waits in Redis, which is flushed before a node
    takes it. Recovery finds the delivery sent but never ended and sends it again; once it has
    ended, recovery leaves it alone. A broker that is down when the message is sent does not
    fail the step that sends it (that step finished the task)."""
    from marketplace.infra.redis_client import get_redis
    from marketplace.scheduling.recovery import recover_stalled
    from marketplace.tasks.lifecycle import send_webhook
    from marketplace.webhooks import delivery as webhooks
    from tests.api.test_api_webhooks import Receiver

    def delivery_state(task_id: str):  # type: ignore[no-untyped-def]
        return _db("SELECT webhook_sent_at, webhook_done_at FROM tasks WHERE id = :t", t=task_id)[0]

    receiver = Receiver()
    user = register(client)
    # No node takes `marketplace.maintenance`, where deliveries go: the message waits in Redis.
    node = _start([q for q in CONTROL if q != "marketplace.maintenance"] + ["cpu.generic"], "no-hooks", get_redis())
    hooks = None
    try:
        task_id = _submit(client, user, {"model": "echo", "inputs": [1, 2], "webhook_url": receiver.url})
        assert wait_for_task(client, user["headers"], task_id)["status"] == "Done"
        sent, done = delivery_state(task_id)
        assert sent is not None and done is None
        # The message is published just after the commit that makes the task Done: flushing
        # before it lands would leave it to arrive afterwards, and it would be delivered twice.
        wait_until(lambda: _queued(get_redis(), "marketplace.maintenance", task_id), 10, "the delivery message queued")
        get_redis().flushall()  # the delivery message is gone

        hooks = _start(["marketplace.maintenance"], "hooks", get_redis())
        monkeypatch.setattr(webhooks, "stall_seconds", lambda: 0.0)
        # `in`, not `==`: another test's delivery, in flight in the shared database, is as stalled
        # at a stall deadline of 0 s.
        assert task_id in recover_stalled()["webhooks"]
        headers, _ = receiver.wait(1)[0]
        assert headers["X-Marketplace-Delivery"] == task_id
        wait_until(lambda: delivery_state(task_id)[1] is not None, 30, "the delivery to be recorded as ended")
        assert task_id not in recover_stalled()["webhooks"]  # ended: not sent again
        time.sleep(1)
        assert len(receiver.deliveries) == 1

        own_broker.stop()
        try:
            assert send_webhook(task_id) is False  # logged, recovery's to re-send; nothing raised
        finally:
            own_broker.start()
    finally:
        node.stop()
        if hooks is not None:
            hooks.stop()
        receiver.stop()


def _strand(client, own_broker, monkeypatch):  # type: ignore[no-untyped-def]
    """A job running on the only cpu.generic node, which dies: its queue has no live node."""
    from marketplace.infra.redis_client import get_redis
    from marketplace.registry.service import deregister
    from marketplace.settings import get_settings

    monkeypatch.setattr(get_settings(), "recovery_stall_seconds", 1.0)
    monkeypatch.setattr(get_settings(), "schedule_timeout", 4.0)
    r = get_redis()
    control = _start(CONTROL, "control", r)
    doomed = _start(["cpu.generic"], "doomed", r)
    user = register(client)
    inputs = [f"x{i}" for i in range(6)]
    task_id = _submit(client, user, {"model": "echo", "inputs": inputs, "batch_size": 1, "params": {"sleep_s": 1.5}})
    wait_until(lambda: _db("SELECT count(*) AS n FROM subtasks WHERE task_id = :t AND status = 'Done'",
                           t=task_id)[0].n >= 2, what="two finished subtasks")
    doomed.stop(signal.SIGKILL)
    deregister(r, hostname=doomed.hostname)  # what its missed heartbeat TTL would do
    return control, user, inputs, task_id


def _reason(client, user, task_id):  # type: ignore[no-untyped-def]
    return client.get(f"/v1/tasks/{task_id}", headers=user["headers"]).get_json()


def test_a_job_whose_nodes_are_all_gone_says_so_then_fails_with_the_reason(client, own_broker, monkeypatch):  # type: ignore[no-untyped-def]
    """Its messages wait in a queue no live node serves: the task says why it waits, keeps the
    time it was first found unserved, and fails with the reason after `schedule_timeout`;
    what its finished subtasks produced is still readable, and all it is charged for."""
    from marketplace.scheduling.recovery import recover_stalled

    control, user, inputs, task_id = _strand(client, own_broker, monkeypatch)
    try:
        time.sleep(1.2)  # past the stall deadline
        assert task_id in recover_stalled()["stranded"]
        first = _reason(client, user, task_id)
        assert first["status"] == "InProgress"
        assert first["status_reason"].startswith("waiting since ")
        assert "no live worker serves cpu.generic for model 'echo'" in first["status_reason"]
        time.sleep(1.2)
        assert task_id in recover_stalled()["stranded"]
        assert _reason(client, user, task_id)["status_reason"] == first["status_reason"]  # timed from the first sweep
        time.sleep(3.0)  # the first flag is now more than schedule_timeout (4 s) old
        assert task_id in recover_stalled()["failed"]
        doc = _reason(client, user, task_id)
        assert doc["status"] == "Failed" and doc["status_reason"] is None
        assert "no live worker serves cpu.generic" in doc["error"] and "gave up after waiting" in doc["error"]

        partial = client.get(f"/v1/tasks/{task_id}/result?partial=true", headers=user["headers"]).get_json()
        done = {r.index for r in _db("SELECT index FROM subtasks WHERE task_id = :t AND status = 'Done'", t=task_id)}
        assert len(done) >= 2
        assert partial["outputs"] == [x if i in done else None for i, x in enumerate(inputs)]
        charged = _db("SELECT s.index FROM ledger_entries l JOIN subtasks s ON s.id = l.subtask_id "
                      "WHERE l.task_id = :t AND l.kind = 'charge'", t=task_id)
        assert {c.index for c in charged} == done
        assert [h.status for h in _db("SELECT status FROM holds WHERE task_id = :t", t=task_id)] == ["released"]
        assert task_id not in recover_stalled()["failed"]  # final: left alone
    finally:
        control.stop()


def test_a_stranded_job_is_cleared_and_finishes_when_a_node_comes_back(client, own_broker, monkeypatch):  # type: ignore[no-untyped-def]
    from marketplace.infra.redis_client import get_redis
    from marketplace.scheduling.recovery import recover_stalled

    control, user, inputs, task_id = _strand(client, own_broker, monkeypatch)
    survivor = None
    try:
        time.sleep(1.2)
        assert task_id in recover_stalled()["stranded"]
        assert _reason(client, user, task_id)["status_reason"].startswith("waiting since ")
        survivor = _start(["cpu.generic"], "survivor", get_redis())
        # Cleared by the `wake` the node sends when it comes up, before any recovery sweep.
        seen: list = []
        wait_until(lambda: seen.append(_reason(client, user, task_id)) or seen[-1]["status_reason"] is None, 20,
                   "the stranded flag cleared")
        assert seen[-1]["status"] == "InProgress"  # cleared while it runs, not by its end
        doc = _drive_recovery(client, user, task_id)
        assert doc["status"] == "Done", doc
        _assert_exactly_once(client, user, task_id, inputs)
    finally:
        control.stop()
        if survivor is not None:
            survivor.stop()


def test_an_any_device_job_whose_gpu_nodes_are_gone_moves_to_the_cpu_queue(client, own_broker, monkeypatch):  # type: ignore[no-untyped-def]
    """Sent with `device: any` to the GPU queue, whose only node then goes (a preempted GPU
    fleet): recovery moves the task to the CPU queue, whose node runs every subtask."""
    from marketplace.infra.redis_client import get_redis
    from marketplace.registry.service import deregister, heartbeat
    from marketplace.scheduling.recovery import recover_stalled
    from marketplace.settings import get_settings

    monkeypatch.setattr(get_settings(), "recovery_stall_seconds", 1.0)
    r = get_redis()
    control = _start(CONTROL, "control", r)
    cpu = _start(["cpu.embedding"], "cpu", r)
    gpu = f"gpu-{uuid.uuid4().hex[:6]}@test"
    heartbeat(r, info={"hostname": gpu, "queues": ["gpu.embedding"], "concurrency": 1})  # no process behind it
    try:
        user = register(client)
        texts = ["a red fox", "a blue whale", "a green tree"]
        task_id = _submit(client, user, {"model": "embedding", "inputs": texts, "device": "any", "batch_size": 2})
        wait_until(lambda: _db("SELECT queue FROM tasks WHERE id = :t", t=task_id)[0].queue == "gpu.embedding",
                   what="the job sent to the GPU queue")
        deregister(r, hostname=gpu)
        time.sleep(1.2)  # past the stall deadline
        report = recover_stalled()
        assert task_id in report["rerouted"] and task_id in report["redispatched"], report
        doc = wait_for_task(client, user["headers"], task_id)
        assert doc["status"] == "Done" and doc["queue"] == "cpu.embedding" and doc["status_reason"] is None
        outputs = client.get(f"/v1/tasks/{task_id}/result", headers=user["headers"]).get_json()["outputs"]
        assert len(outputs) == 3 and all(len(v) == 384 for v in outputs)
        workers = {w.worker for w in _db("SELECT worker FROM subtasks WHERE task_id = :t", t=task_id)}
        assert workers == {cpu.hostname}
        records = client.get(f"/v1/audit?task_id={task_id}&limit=1000", headers=user["headers"]).get_json()["records"]
        moved = [r_ for r_ in records if r_["action"] == "task.rerouted"]
        assert len(moved) == 1 and moved[0]["data"]["from"] == "gpu.embedding" and moved[0]["data"]["to"] == "cpu.embedding"
        assigned = _db("SELECT payload FROM outbox_events WHERE key = :t AND type = 'TaskAssigned' ORDER BY id",
                       t=task_id)
        assert [(a.payload["queue"], a.payload["dispatch_count"]) for a in assigned] == [
            ("gpu.embedding", 1), ("cpu.embedding", 2)]
    finally:
        deregister(r, hostname=gpu)
        control.stop()
        cpu.stop()

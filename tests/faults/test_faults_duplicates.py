"""Recovery must not make a subtask run twice at once, nor flood a busy queue with copies."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

from sqlalchemy import text

from tests.support.api import register


def _task_with_subtasks(client, n: int) -> tuple[str, list[str]]:  # type: ignore[no-untyped-def]
    """A task no worker consumes yet (own broker, no node): rows only."""
    from marketplace.infra.db import get_engine

    user = register(client)
    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": list(range(n)), "batch_size": 1},
                       headers=user["headers"])
    task_id = resp.get_json()["id"]
    with get_engine().begin() as conn:
        conn.execute(text("UPDATE tasks SET status = 'Scheduled', queue = 'cpu.generic', "
                          "progress_at = now() - interval '1 hour' WHERE id = :t"), {"t": task_id})
        # Sent once, as the fair dispatcher would have: recovery judges what was sent.
        conn.execute(text("UPDATE subtasks SET dispatches = 1 WHERE task_id = :t"), {"t": task_id})
        ids = [str(r.id) for r in conn.execute(text("SELECT id FROM subtasks WHERE task_id = :t ORDER BY index"),
                                               {"t": task_id})]
    return task_id, ids


def _heartbeat(hostname: str) -> None:
    from marketplace.infra.redis_client import get_redis
    from marketplace.registry.service import heartbeat

    heartbeat(get_redis(), info={"hostname": hostname, "queues": ["cpu.generic"], "concurrency": 1})


def _empty_queue(r, queue: str = "cpu.generic") -> None:  # type: ignore[no-untyped-def]
    """Every list kombu keeps the queue in: recovery re-sends other tests' stalled subtasks with
    their priority, into `<queue><sep><step>`, and those count as the queue's depth."""
    from marketplace.infra.broker import broker_lists
    from marketplace.infra.celery_app import app

    r.delete(*broker_lists(queue, dict(app.conf.broker_transport_options or {})))


def test_a_second_message_for_a_subtask_running_on_a_live_node_is_skipped(client, own_broker):  # type: ignore[no-untyped-def]
    from marketplace.tasks.lifecycle import claim

    _task, (sid,) = _task_with_subtasks(client, 1)
    _heartbeat("node-a@test")
    early, work = claim(sid, node="node-a@test", message_id=f"{sid}:1")
    assert early is None and work.attempts == 1
    early, _ = claim(sid, node="node-b@test", message_id=f"{sid}:2")  # recovery's copy
    assert early is not None and early["skipped"] and "node-a@test" in early["error"]
    early, work = claim(sid, node="node-a@test", message_id=f"{sid}:1")  # redelivery: runs
    assert early is None and work.attempts == 2


def test_the_copy_runs_when_the_first_run_outlived_its_time_limit_on_a_live_node(client, own_broker):  # type: ignore[no-untyped-def]
    """Nothing runs a subtask past its hard limit (a kill at the limit, or a database crash that
    forgot its completion, leaves it Running): recovery's copy must take it over, live node or not."""
    from marketplace.infra.db import get_engine
    from marketplace.tasks.lifecycle import claim

    _task, (sid,) = _task_with_subtasks(client, 1)
    _heartbeat("node-a@test")
    early, _ = claim(sid, node="node-a@test", message_id=f"{sid}:1")
    assert early is None
    with get_engine().begin() as conn:  # echo's limit is 60 s; the margin 60 s more
        conn.execute(text("UPDATE subtasks SET started_at = now() - interval '119 seconds' WHERE id = :s"), {"s": sid})
    early, _ = claim(sid, node="node-b@test", message_id=f"{sid}:2")
    assert early is not None and early["skipped"], "still within its limit: left to node-a"
    with get_engine().begin() as conn:
        conn.execute(text("UPDATE subtasks SET started_at = now() - interval '121 seconds' WHERE id = :s"), {"s": sid})
    early, work = claim(sid, node="node-b@test", message_id=f"{sid}:3")
    assert early is None and work.attempts == 2


def test_a_subtask_that_keeps_outliving_its_time_limit_fails_with_the_reason(client, own_broker):  # type: ignore[no-untyped-def]
    from marketplace.infra.db import get_engine
    from marketplace.tasks.lifecycle import claim
    from workers import runner

    task_id, (sid,) = _task_with_subtasks(client, 1)
    _heartbeat("node-a@test")
    early, _ = claim(sid, node="node-a@test", message_id=f"{sid}:1")
    assert early is None
    # A retry of the same message starts a new attempt: it is judged by that start, not the first.
    with get_engine().begin() as conn:
        conn.execute(text("UPDATE subtasks SET started_at = now() - interval '1 hour' WHERE id = :s"), {"s": sid})
    early, _ = claim(sid, node="node-a@test", message_id=f"{sid}:1")
    assert early is None
    early, _ = claim(sid, node="node-b@test", message_id=f"{sid}:2")
    assert early is not None and early["skipped"], "the retry just started: left to node-a"
    with get_engine().begin() as conn:  # the fourth attempt also ran past echo's 60 s limit (+60 s)
        conn.execute(text("UPDATE subtasks SET started_at = now() - interval '1 hour', attempts = 4 WHERE id = :s"),
                     {"s": sid})
    outcome = runner.execute(sid, hostname="node-b@test", retries_left=True, message_id=f"{sid}:3")
    assert outcome["ok"] is False and "time limit (60s) in 4 attempts" in outcome["error"], outcome
    with get_engine().connect() as conn:
        sub = conn.execute(text("SELECT status, error FROM subtasks WHERE id = :s"), {"s": sid}).one()
        task = conn.execute(text("SELECT status, error FROM tasks WHERE id = :t"), {"t": task_id}).one()
    assert sub.status == "Failed" and "node-a@test" in sub.error
    assert task.status == "Failed" and "time limit" in task.error


def test_the_copy_runs_when_the_first_node_is_gone(client, own_broker):  # type: ignore[no-untyped-def]
    from marketplace.tasks.lifecycle import claim

    _task, (sid,) = _task_with_subtasks(client, 1)
    early, _ = claim(sid, node="dead-node@test", message_id=f"{sid}:1")  # no heartbeat: gone
    assert early is None
    early, work = claim(sid, node="node-b@test", message_id=f"{sid}:2")
    assert early is None and work.attempts == 2


def test_recovery_leaves_pending_subtasks_alone_while_their_queue_is_busy(client, own_broker, monkeypatch):  # type: ignore[no-untyped-def]
    from marketplace.infra.redis_client import get_redis
    from marketplace.scheduling.recovery import recover_stalled, redeclare_queues
    from marketplace.settings import get_settings

    monkeypatch.setattr(get_settings(), "recovery_stall_seconds", 1.0)
    redeclare_queues()  # a live system: workers and every recovery sweep declare the queues
    task_id, _ids = _task_with_subtasks(client, 3)
    r = get_redis()
    _empty_queue(r)
    r.lpush("cpu.generic", json.dumps({"other": str(uuid.uuid4())}))  # someone else's work ahead of ours
    assert task_id not in recover_stalled()["redispatched"]
    _empty_queue(r)
    time.sleep(1.2)  # the first pass counted as a look at the task: it must stall again
    assert task_id in recover_stalled()["redispatched"]  # queue empty and no progress: the messages were lost


def test_recovery_resends_what_a_flushed_redis_lost_even_behind_newer_work(client, own_broker, monkeypatch):  # type: ignore[no-untyped-def]
    """After a FLUSHALL the queue may fill with newer work at once: its depth no longer says
    that the older messages still wait in it."""
    from marketplace.infra.db import get_engine
    from marketplace.infra.redis_client import get_redis
    from marketplace.scheduling.recovery import recover_stalled, redeclare_queues
    from marketplace.settings import get_settings

    monkeypatch.setattr(get_settings(), "recovery_stall_seconds", 1.0)
    redeclare_queues()
    stalled, _ = _task_with_subtasks(client, 2)
    recent, _ = _task_with_subtasks(client, 2)
    with get_engine().begin() as conn:  # not stalled at the first sweep, however slow this machine is
        conn.execute(text("UPDATE tasks SET progress_at = now() + interval '1 hour' WHERE id = :t"), {"t": recent})
    r = get_redis()
    r.flushall()  # both tasks' messages are gone
    r.lpush("cpu.generic", json.dumps({"other": str(uuid.uuid4())}))  # newer work, sent after the flush
    report = recover_stalled()
    assert stalled in report["redispatched"] and recent not in report["redispatched"]
    with get_engine().begin() as conn:  # the second task stalls later; it was sent before the loss was found
        conn.execute(text("UPDATE tasks SET progress_at = now() - interval '1 hour' WHERE id = :t"), {"t": recent})
    assert recent in recover_stalled()["redispatched"]
    time.sleep(1.2)  # nothing was lost since: a busy queue means waiting again
    r.lpush("cpu.generic", json.dumps({"other": str(uuid.uuid4())}))
    assert not {stalled, recent} & set(recover_stalled()["redispatched"])


# A node that takes one message off the queue and dies before acknowledging it (SIGKILL).
_TAKE_AND_DIE = """
import os, signal
from marketplace.infra.celery_app import app
with app.connection_for_read() as conn:
    message = conn.SimpleQueue("cpu.generic", no_ack=False).get(timeout=20)
    print(message.headers["id"], flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _queued_ids(queue: str) -> list[str]:
    from marketplace.infra.broker import broker_lists
    from marketplace.infra.celery_app import app
    from marketplace.infra.redis_client import get_redis

    ids = []
    for name in broker_lists(queue, dict(app.conf.broker_transport_options)):
        for raw in get_redis().lrange(name, 0, -1):
            headers = json.loads(raw).get("headers") or {}
            if "id" in headers:
                ids.append(headers["id"])
    return ids


def test_recovery_resends_a_subtask_whose_message_a_dead_node_holds(client, own_broker, monkeypatch):  # type: ignore[no-untyped-def]
    """kombu would give the message back only after its visibility timeout (an hour), and the
    queue is busy with other work: recovery must not read that as 'waiting its turn'."""
    from marketplace.infra.broker import held_since
    from marketplace.infra.db import utcnow
    from marketplace.infra.redis_client import get_redis
    from marketplace.scheduling.dispatch import publish
    from marketplace.scheduling.recovery import recover_stalled, redeclare_queues
    from marketplace.settings import get_settings
    from tests.support.servers import ROOT

    monkeypatch.setattr(get_settings(), "recovery_stall_seconds", 1.0)
    redeclare_queues()
    task_id, (taken, waiting) = _task_with_subtasks(client, 2)
    publish(task_id, [f"{taken}:1"], queue="cpu.generic", time_limit=60)
    proc = subprocess.run([sys.executable, "-c", _TAKE_AND_DIE], cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9 and proc.stdout.strip() == f"{taken}:1", (proc.returncode, proc.stderr[-2000:])
    get_redis().lpush("cpu.generic", json.dumps({"other": str(uuid.uuid4())}))  # others' work ahead
    time.sleep(1.2)  # held past the deadline
    assert f"{taken}:1" in held_since(utcnow())

    assert task_id in recover_stalled()["redispatched"]
    queued = _queued_ids("cpu.generic")
    assert f"{taken}:2" in queued, queued
    assert not [m for m in queued if m.startswith(waiting)], "the other subtask waits its turn"
    time.sleep(1.2)  # the old copy is still held, but the subtask now waits for its new message
    assert task_id not in recover_stalled()["redispatched"]

"""The Kafka bridge against librdkafka's mock cluster (a separate process, reached over TCP)."""
from __future__ import annotations

import json
import socket
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from marketplace.events import codec
from marketplace.pb.kafka import messages_pb2 as pb
from tests.support.api import register, wait_for_task


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # closed again when we return: nothing listens


def _relay(bootstrap: str, **kw):  # type: ignore[no-untyped-def]
    from marketplace.events.relay import Relay

    return Relay(bootstrap=bootstrap, **kw)


def _rows(key: str) -> list:  # type: ignore[type-arg]
    from marketplace.events.models import OutboxEvent
    from marketplace.infra.db import session_scope

    with session_scope() as session:
        return list(session.execute(
            select(OutboxEvent.id, OutboxEvent.type, OutboxEvent.sent_at).where(OutboxEvent.key == key)
            .order_by(OutboxEvent.id)
        ).all())


def _by_key(records, key: str) -> list:  # type: ignore[no-untyped-def, type-arg]
    return [r for r in records if r.key() == key.encode()]


def test_finished_task_events_arrive_in_order_and_decode(stack, client, worker, kafka_bootstrap, kafka_consume):  # type: ignore[no-untyped-def]
    from marketplace.events.relay import wait_idle
    from marketplace.settings import get_settings

    user = register(client)
    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": list(range(6)), "batch_size": 2},
                       headers=user["headers"])
    task_id = resp.get_json()["id"]
    assert wait_for_task(client, user["headers"], task_id)["status"] == "Done"
    from marketplace.audit.service import chain_pending

    chain_pending()  # the task's buffered audit records into the chain, and their AuditEvents out
    wait_idle(_relay(kafka_bootstrap))
    rows = _rows(task_id)
    assert rows and all(r.sent_at is not None for r in rows)

    s = get_settings()
    # TaskStarted is for the task's event streams only: marked sent, with no record.
    assert [r.type for r in rows].count("TaskStarted") == 1
    want = len([r for r in rows if r.type not in codec.LOCAL_EVENTS])
    records = kafka_consume([s.topic_tasks, s.topic_subtasks, s.topic_audit],
                            until=lambda recs: len(_by_key(recs, task_id)) >= want)
    mine = _by_key(records, task_id)
    assert len(mine) == want
    events = [codec.decode(r.value()) for r in mine]
    headers = [dict(r.headers())["type"].decode() for r in mine]
    assert headers == [e.DESCRIPTOR.name for e in events]

    lifecycle = [e for e, r in zip(events, mine, strict=True) if r.topic() == s.topic_tasks]
    assert [e.DESCRIPTOR.name for e in lifecycle] == ["TaskCreated", "TaskAssigned", "TaskCompleted"]
    assert [e.event_id for e in lifecycle] == sorted(e.event_id for e in lifecycle)
    created, assigned, completed = lifecycle
    assert created.task_id == task_id and created.user_id == user["id"] and created.model == "echo"
    assert created.total_items == 6 and created.estimated_cost and created.occurred_at.seconds > 0
    assert assigned.queue == "cpu.generic" and assigned.subtask_count == 3
    assert completed.result_key == f"results/{task_id}/result.json" and completed.cost

    subs = [e for e, r in zip(events, mine, strict=True) if r.topic() == s.topic_subtasks]
    assert sorted(e.index for e in subs) == [0, 1, 2]
    assert all(isinstance(e, pb.SubTaskCompleted) and e.status == "Done" and e.items == 2 for e in subs)
    assert all(e.user_id == user["id"] for e in subs)  # it was never filled
    audits = [e for e, r in zip(events, mine, strict=True) if r.topic() == s.topic_audit]
    assert all(isinstance(e, pb.AuditEvent) and e.task_id == task_id for e in audits)
    # Each record's user, and its own time: a consumer checks its hash again from the message
    # alone (occurred_at was when it was chained, which the hash does not cover).
    from datetime import UTC

    from marketplace.audit.service import record_hash

    assert audits and all(e.user_id == user["id"] for e in audits), {(e.action, e.user_id) for e in audits}
    for e in audits:
        ts = e.occurred_at.ToDatetime().replace(tzinfo=UTC)
        assert record_hash(prev_hash=e.prev_hash, seq=e.seq, ts=ts, actor=e.actor, action=e.action,
                           subject=e.subject, task_id=e.task_id or None, data=e.data_json) == e.hash, e.action
    assert len(lifecycle) + len(subs) + len(audits) == want
    # One partition per task: every record of the task landed on the same partition of its topic.
    assert len({(r.topic(), r.partition()) for r in mine}) == len({r.topic() for r in mine})
    assert sorted(e.event_id for e in events) == [r.id for r in rows if r.type not in codec.LOCAL_EVENTS]  # each once
    for topic in {r.topic() for r in mine}:  # and in outbox order within each topic
        ids = [e.event_id for e, r in zip(events, mine, strict=True) if r.topic() == topic]
        assert ids == sorted(ids)


def test_kafka_down_events_wait_in_the_outbox_then_all_arrive_in_order(stack, kafka_bootstrap, kafka_consume):  # type: ignore[no-untyped-def]
    from marketplace.events.outbox import emit
    from marketplace.events.relay import wait_idle
    from marketplace.infra.db import session_scope
    from marketplace.settings import get_settings

    keys = [str(uuid.uuid4()) for _ in range(3)]
    with session_scope() as session:
        for step in range(4):  # interleaved: task A, B, C, A, B, C, ...
            for key in keys:
                emit(session, type="TaskAssigned", key=key,
                     payload={"task_id": key, "user_id": key, "queue": "cpu.generic", "subtasks": step})

    down = _relay(_closed_port(), delivery_timeout=2.0)
    for _ in range(2):  # retried, still nothing gets out and nothing is marked
        report = down.run_batch()
        assert report.leader and not report.sent and set(report.failed) >= {r.id for k in keys for r in _rows(k)}
    for key in keys:
        assert [r.sent_at for r in _rows(key)] == [None] * 4

    wait_idle(_relay(kafka_bootstrap))
    for key in keys:
        assert all(r.sent_at is not None for r in _rows(key))
    records = kafka_consume([get_settings().topic_tasks],
                            until=lambda recs: all(len(_by_key(recs, k)) >= 4 for k in keys))
    for key in keys:
        mine = [codec.decode(r.value()) for r in _by_key(records, key)]
        # No event lost; duplicates (at-least-once) would share an event_id.
        assert [e.subtask_count for e in mine] == [0, 1, 2, 3]
        assert [e.event_id for e in mine] == [r.id for r in _rows(key)]


def test_only_one_bridge_relays_at_a_time(stack, kafka_bootstrap):  # type: ignore[no-untyped-def]
    from sqlalchemy import text

    from marketplace.events.relay import RELAY_LOCK
    from marketplace.infra.db import new_session

    holder = new_session()
    try:
        holder.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": RELAY_LOCK})
        assert _relay(kafka_bootstrap).run_batch().leader is False
    finally:
        holder.rollback()
        holder.close()
    assert _relay(kafka_bootstrap).run_batch().leader is True


def _submit(**fields) -> bytes:  # type: ignore[no-untyped-def]
    return pb.SubmitTask(**fields).SerializeToString()


def _consumer(bootstrap: str, topic: str, dlq: str):  # type: ignore[no-untyped-def]
    from marketplace.events.consumer import SubmissionConsumer

    return SubmissionConsumer(bootstrap=bootstrap, topic=topic, dlq_topic=dlq, group_id=f"g-{uuid.uuid4().hex}")


def _drain(consumer, n: int, timeout: float = 60.0) -> list[str]:  # type: ignore[no-untyped-def]
    import time

    out: list[str] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        result = consumer.poll_once(0.5)
        if result is not None:
            out.append(result)
    return out


def test_a_replayed_submission_creates_one_task(stack, client, kafka_bootstrap, kafka_produce):  # type: ignore[no-untyped-def]
    from marketplace.infra.db import session_scope
    from marketplace.tasks.models import Task

    topic, dlq = f"submissions-{uuid.uuid4().hex[:8]}", f"dlq-{uuid.uuid4().hex[:8]}"
    user = register(client)
    by_id = _submit(user_id=user["id"], idempotency_key="sub-1", model="echo", inputs=['"a"', "2", '{"b": 3}'])
    by_token = _submit(api_token=user["tokens"]["access_token"], idempotency_key="sub-2", model="echo",
                       inputs=['"x"'], priority=5)
    kafka_produce(topic, [(b"k1", by_id), (b"k1", by_id), (b"k2", by_token), (b"k2", by_token)])

    consumer = _consumer(kafka_bootstrap, topic, dlq)
    try:
        results = _drain(consumer, 4)
    finally:
        consumer.close()
    assert sorted(results) == ["created", "created", "duplicate", "duplicate"]
    with session_scope() as session:
        tasks = {t.idempotency_key: t for t in session.scalars(select(Task).where(Task.user_id == uuid.UUID(user["id"])))}
    assert set(tasks) == {"sub-1", "sub-2"}
    assert tasks["sub-1"].total_items == 3 and tasks["sub-2"].priority == 5
    # Created exactly as REST does: scheduled and run by the pipeline (if a worker is up) or at least visible.
    doc = client.get(f"/v1/tasks/{tasks['sub-1'].id}", headers=user["headers"]).get_json()
    assert doc["model"] == "echo" and doc["progress"]["total"] == 1


def test_garbage_and_invalid_submissions_go_to_the_dlq_with_a_reason(stack, client, kafka_bootstrap, kafka_produce,  # type: ignore[no-untyped-def]
                                                                      kafka_consume):
    topic, dlq = f"submissions-{uuid.uuid4().hex[:8]}", f"dlq-{uuid.uuid4().hex[:8]}"
    user = register(client)
    bad = [
        (b"g1", b"\xff\xff\xffnot a protobuf"),
        (b"g2", _submit(user_id=user["id"], model="echo", inputs=["1"])),  # no idempotency key
        (b"g3", _submit(idempotency_key="k", model="echo", inputs=["1"])),  # no principal
        (b"g4", _submit(api_token="forged", idempotency_key="k", model="echo", inputs=["1"])),
        (b"g5", _submit(user_id=user["id"], idempotency_key="k5", model="no-such-model", inputs=["1"])),
        (b"g6", _submit(user_id=user["id"], idempotency_key="k6", model="echo", inputs=["{oops"])),
    ]
    kafka_produce(topic, bad)
    consumer = _consumer(kafka_bootstrap, topic, dlq)
    try:
        assert _drain(consumer, len(bad)) == ["dead-lettered"] * len(bad)
    finally:
        consumer.close()

    letters = {r.key(): pb.DeadLetter.FromString(r.value())
               for r in kafka_consume([dlq], until=lambda recs: len(recs) >= len(bad))}
    assert set(letters) == {k for k, _ in bad}
    for key, value in bad:
        letter = letters[key]
        assert letter.payload == value and letter.source_topic == topic and letter.reason
    assert "not a SubmitTask" in letters[b"g1"].reason
    assert "idempotency_key" in letters[b"g2"].reason
    assert "principal" in letters[b"g3"].reason
    assert "token" in letters[b"g4"].reason
    assert "model" in letters[b"g5"].reason
    assert "inputs[0]" in letters[b"g6"].reason


def test_poison_submissions_are_dead_lettered_and_the_partition_moves_on(stack, client, kafka_bootstrap,  # type: ignore[no-untyped-def]
                                                                          kafka_produce, kafka_consume):
    """A NUL in the key failed the dedupe query and nesting past the parser's stack raised
    RecursionError: both were taken for outages and retried forever, and the valid submission
    behind them never ran. A key reused with another body was answered "duplicate" and dropped."""
    from marketplace.infra.db import session_scope
    from marketplace.tasks.models import Task

    topic, dlq = f"submissions-{uuid.uuid4().hex[:8]}", f"dlq-{uuid.uuid4().hex[:8]}"
    user = register(client)
    records = [
        (b"p1", _submit(user_id=user["id"], idempotency_key="a\x00b", model="echo", inputs=["1"])),
        (b"p2", _submit(user_id=user["id"], idempotency_key="p2", model="echo", inputs=["[" * 5000 + "]" * 5000])),
        # One Kafka key, one partition: the first body is the task, the second a conflict.
        (b"same", _submit(user_id=user["id"], idempotency_key="same", model="echo", inputs=["1"])),
        (b"same", _submit(user_id=user["id"], idempotency_key="same", model="echo", inputs=["2", "3"])),
        (b"p5", _submit(user_id=user["id"], idempotency_key="valid", model="echo", inputs=["4"])),
    ]
    kafka_produce(topic, records)
    consumer = _consumer(kafka_bootstrap, topic, dlq)
    consumer.retry_backoff = 0.1
    try:  # keys spread over partitions: the order across keys is Kafka's
        assert sorted(_drain(consumer, len(records), timeout=30)) == ["created"] * 2 + ["dead-lettered"] * 3
    finally:
        consumer.close()
    letters = {r.key(): pb.DeadLetter.FromString(r.value())
               for r in kafka_consume([dlq], until=lambda recs: len(recs) >= 3)}
    assert "Idempotency-Key" in letters[b"p1"].reason
    assert "inputs[0]" in letters[b"p2"].reason and "nested too deeply" in letters[b"p2"].reason
    assert "Idempotency-Key" in letters[b"same"].reason and "different" in letters[b"same"].reason
    assert pb.SubmitTask.FromString(letters[b"same"].payload).inputs == ["2", "3"]
    with session_scope() as session:
        keys = sorted(session.scalars(select(Task.idempotency_key).where(Task.user_id == uuid.UUID(user["id"]))))
    assert keys == ["same", "valid"]


# -- codec and pruning (no Kafka needed) -------------------------------------------------------------------

def test_codec_maps_every_outbox_type_to_an_envelope():  # type: ignore[no-untyped-def]
    from marketplace.infra.db import utcnow

    now = utcnow()
    value, headers = codec.encode(event_id=7, type="TaskCancelled", key="t1", created_at=now,
                                  payload={"task_id": "t1", "status": "Cancelled", "cost": "0.5", "error": None})
    event = codec.decode(value)
    assert isinstance(event, pb.TaskFailed) and event.status == "Cancelled" and event.cost == "0.5"
    assert event.event_id == 7 and event.task_id == "t1"
    assert abs(event.occurred_at.ToDatetime(tzinfo=now.tzinfo) - now) < timedelta(milliseconds=1)
    assert dict(headers)["type"] == b"TaskFailed"
    audit = codec.decode(codec.encode(event_id=8, type="AuditEvent", key="", created_at=now,
                                      payload={"seq": 3, "action": "login", "data": {"a": 1}})[0])
    assert audit.seq == 3 and json.loads(audit.data_json) == {"a": 1}
    sub = codec.decode(codec.encode(event_id=9, type="SubTaskCompleted", key="t2", created_at=now,
                                    payload={"index": 1, "seconds": 0.25, "items": 4, "status": "Done"})[0])
    assert sub.task_id == "t2" and sub.seconds == 0.25 and sub.items == 4
    verified = codec.decode(codec.encode(event_id=10, type="SubTaskVerified", key="t3", created_at=now, payload={
        "task_id": "t3", "index": 2, "accepted_subtask_id": "s1", "accepted_replica": 1, "accepted_node": "a@h",
        "result_sha256": "ab", "replicas": 3, "agreed_nodes": ["a@h", "b@h"], "disagreed_nodes": ["liar@h"]})[0])
    assert isinstance(verified, pb.SubTaskVerified) and verified.accepted_node == "a@h"
    assert (verified.index, verified.accepted_replica, verified.replicas) == (2, 1, 3)
    assert list(verified.agreed_nodes) == ["a@h", "b@h"] and list(verified.disagreed_nodes) == ["liar@h"]
    with pytest.raises(codec.UnknownEvent):
        codec.encode(event_id=1, type="Bogus", key="k", payload={}, created_at=now)


def test_prune_deletes_old_relayed_rows_and_old_unsent_rows_only_when_kafka_is_off(stack):  # type: ignore[no-untyped-def]
    from marketplace.events.models import OutboxEvent
    from marketplace.events.relay import prune, prune_outbox
    from marketplace.infra.db import session_scope, utcnow

    key = str(uuid.uuid4())
    old = utcnow() - timedelta(hours=48)
    with session_scope() as session:
        for created, sent in [(old, old), (old, None), (utcnow(), utcnow()), (utcnow(), None)]:
            session.add(OutboxEvent(topic="t", key=key, type="TaskCreated", payload={}, created_at=created,
                                    sent_at=sent))

    def count() -> int:
        with session_scope() as session:
            return session.scalar(select(func.count()).select_from(OutboxEvent).where(OutboxEvent.key == key))

    with session_scope() as session:
        prune_outbox(session, older_than=timedelta(hours=24))
    assert count() == 3  # only the old relayed row went; the unsent one still waits for Kafka
    # A bridge relays the unsent ones whatever its settings say (`bridge --bootstrap-servers X`
    # without the setting deleted rows it had yet to send).
    prune(include_unsent=False)
    assert count() == 3
    prune()  # no MARKETPLACE_KAFKA_BOOTSTRAP_SERVERS in tests: the old unsent row ages out too
    assert count() == 2


def test_bridge_command_without_kafka_says_it_is_off(stack):  # type: ignore[no-untyped-def]
    from click.testing import CliRunner

    from marketplace.cli.main import main

    result = CliRunner().invoke(main, ["bridge"])
    assert result.exit_code == 1
    assert "MARKETPLACE_KAFKA_BOOTSTRAP_SERVERS is not set" in result.output and "pruned" in result.output


def test_marketplace_bridge_command_relays_and_consumes(stack, client, kafka_bootstrap, kafka_produce, kafka_consume):  # type: ignore[no-untyped-def]
    """`marketplace bridge` as deployed: a Kafka submission becomes a task whose TaskCreated comes back out."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from marketplace.infra.db import session_scope
    from marketplace.settings import get_settings
    from marketplace.tasks.models import Task

    user = register(client)
    key = f"bridge-{uuid.uuid4().hex[:8]}"
    exe = Path(sys.executable).parent / "marketplace"
    env = {**os.environ, "MARKETPLACE_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap}
    proc = subprocess.Popen([str(exe), "bridge"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        kafka_produce(get_settings().topic_submissions,
                      [(b"k", _submit(user_id=user["id"], idempotency_key=key, model="echo", inputs=["1", "2"]))])
        task_id = None
        deadline = time.monotonic() + 90
        while task_id is None and time.monotonic() < deadline and proc.poll() is None:
            with session_scope() as session:
                task_id = session.scalar(select(Task.id).where(Task.idempotency_key == key))
            time.sleep(0.5)
        assert task_id is not None, "the bridge did not create the task"
        records = kafka_consume([get_settings().topic_tasks],
                                until=lambda recs: any(r.key() == str(task_id).encode() for r in recs))
        created = [codec.decode(r.value()) for r in _by_key(records, str(task_id))]
        assert created and isinstance(created[0], pb.TaskCreated) and created[0].total_items == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=90)[0].decode(errors="replace")
    assert proc.returncode == 0, out


def test_events_emitted_together_are_stored_in_the_order_given(stack):  # type: ignore[no-untyped-def]
    """`emit_many` writes them in one statement: ids follow the list, each with its own key and payload."""
    from marketplace.events.models import OutboxEvent
    from marketplace.events.outbox import emit, emit_many, topic_for
    from marketplace.infra.db import session_scope

    keys = [f"order-{uuid.uuid4().hex}" for _ in range(40)]
    with session_scope() as session:
        emit_many(session, type="AuditEvent", events=[(k, {"i": i, "text": "é \"q\"", "none": None})
                                                      for i, k in enumerate(keys)])
        emit(session, type="SubTaskCompleted", key=keys[0], payload={"last": True})
        emit_many(session, type="TaskCreated", events=[])  # nothing
    with session_scope() as session:
        rows = session.execute(select(OutboxEvent.key, OutboxEvent.type, OutboxEvent.topic, OutboxEvent.payload,
                                      OutboxEvent.sent_at).where(OutboxEvent.key.in_(keys))
                               .order_by(OutboxEvent.id)).all()
    assert [(r.key, r.type, r.payload) for r in rows] == (
        [(k, "AuditEvent", {"i": i, "text": "é \"q\"", "none": None}) for i, k in enumerate(keys)]
        + [(keys[0], "SubTaskCompleted", {"last": True})])
    assert {r.topic for r in rows[:-1]} == {topic_for("AuditEvent")} and rows[-1].topic == topic_for("SubTaskCompleted")
    assert all(r.sent_at is None for r in rows)


def _outbox_keys(keys: list[str]) -> list[tuple[str, str]]:
    from marketplace.events.models import OutboxEvent
    from marketplace.infra.db import session_scope

    with session_scope() as session:
        return [tuple(r) for r in session.execute(select(OutboxEvent.key, OutboxEvent.type)
                                                  .where(OutboxEvent.key.in_(keys)).order_by(OutboxEvent.id))]


def test_events_are_written_only_by_a_commit_of_their_transaction(stack):  # type: ignore[no-untyped-def]
    """Deferred to the commit: a rollback, or a session closed without one, leaves none behind,
    even when the same session commits later; a savepoint's rollback takes only its own."""
    from marketplace.events.outbox import emit
    from marketplace.infra.db import new_session

    keys = [f"deferred-{uuid.uuid4().hex}" for _ in range(5)]
    session = new_session()
    emit(session, type="TaskCreated", key=keys[0], payload={})
    session.rollback()
    emit(session, type="TaskCreated", key=keys[1], payload={})
    session.close()
    emit(session, type="TaskCreated", key=keys[2], payload={})
    with session.begin_nested():
        emit(session, type="TaskCreated", key=keys[3], payload={})
    nested = session.begin_nested()
    emit(session, type="TaskFailed", key=keys[4], payload={})
    nested.rollback()
    emit(session, type="TaskCompleted", key=keys[1], payload={})
    session.commit()
    session.close()
    assert _outbox_keys(keys) == [(keys[2], "TaskCreated"), (keys[3], "TaskCreated"), (keys[1], "TaskCompleted")]


def test_a_chained_audit_record_still_gets_its_audit_event(stack):  # type: ignore[no-untyped-def]
    """`append` chains in the first before_commit hook, whose AuditEvent the outbox's hook writes after it."""
    from marketplace.audit import service as audit
    from marketplace.infra.db import session_scope

    subject = f"test:{uuid.uuid4().hex}"
    with session_scope() as session:
        audit.append(session, actor="test", action="test.chained", subject=subject, data={})
    assert _outbox_keys([subject]) == [(subject, "AuditEvent")]

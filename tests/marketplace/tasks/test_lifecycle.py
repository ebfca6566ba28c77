"""The lifecycle's doors on real PostgreSQL and Redis, without a worker: each move, what it writes
beside the moved row, and what it refuses. Prices are echo's from the price card
(config/models.yaml): start fee 0.0001, 0.0001 per second, 0.000001 per item, `failed: start_fee`."""
from __future__ import annotations

import uuid
from decimal import Decimal

import pytest
from sqlalchemy import text

from tests.support.api import register
from tests.support.progress import claimed, stored_task


def _db(sql: str, **params):  # type: ignore[no-untyped-def]
    from marketplace.infra.db import get_engine

    with get_engine().connect() as conn:
        return conn.execute(text(sql), params).all()


def _statuses(task_id: str) -> list[str]:
    return [r.status for r in _db("SELECT status FROM subtasks WHERE task_id = :t ORDER BY index", t=task_id)]


def _charges(task_id: str) -> list[tuple[str, Decimal]]:
    return [(r.kind, r.amount) for r in _db(
        "SELECT kind, amount FROM ledger_entries WHERE task_id = :t AND kind LIKE 'charge%%' ORDER BY created_at",
        t=task_id)]


def test_the_statements_take_their_statuses_from_the_moves_table():
    from marketplace.tasks.lifecycle.moves import sources

    assert sources("subtask", "Running") == ("Pending", "Running")
    assert sources("subtask", "Done") == ("Running",)
    assert sources("subtask", "Cancelled") == ("Pending", "Running")
    assert sources("task", "InProgress") == ("Created", "Scheduled")
    assert sources("task", "Done") == ("InProgress",)


def test_a_move_the_table_does_not_allow_is_refused(client):  # type: ignore[no-untyped-def]
    from marketplace.infra.db import session_scope
    from marketplace.tasks import lifecycle
    from marketplace.tasks.lifecycle.moves import IllegalMove, check
    from marketplace.tasks.models import TaskStatus

    with pytest.raises(IllegalMove):
        check("task", "Done", "Scheduled")
    with pytest.raises(IllegalMove):
        check("subtask", "Done", "Running")
    task_id, _ = stored_task(register(client)["id"], ["a"])
    with session_scope() as session, pytest.raises(IllegalMove):  # Scheduled, nothing ran: not Done
        lifecycle.finish(session, task=lifecycle.lock_task(session, task_id), status=TaskStatus.DONE)


def test_complete_records_the_outcome_its_event_its_charge_and_its_records_in_one_statement(client):  # type: ignore[no-untyped-def]
    from marketplace.tasks import lifecycle

    task_id, (sid,) = stored_task(register(client)["id"], ["a"])
    work = claimed(sid)
    recorded = lifecycle.complete(work, node="doors@test", key="k", sha256="s", seconds=2.0)
    assert recorded.moved and recorded.last and recorded.subtasks == 1
    assert _statuses(task_id) == ["Done"]
    # 0.0001 start + 2 s x 0.0001 + 1 item x 0.000001 = 0.000301
    assert _charges(task_id) == [("charge", Decimal("-0.000301"))]
    (event,) = _db("SELECT payload FROM outbox_events WHERE key = :t AND type = 'SubTaskCompleted'", t=task_id)
    assert event.payload["status"] == "Done" and event.payload["subtask_id"] == sid and "error" not in event.payload
    actions = {r.action for r in _db("SELECT action FROM audit_pending WHERE task_id = :t", t=task_id)}
    assert {"subtask.finished", "billing.charge"} <= actions
    again = lifecycle.complete(work, node="doors@test", key="k", sha256="s", seconds=2.0)
    assert not again.moved and _charges(task_id) == [("charge", Decimal("-0.000301"))], "once"


def test_a_failure_fails_its_task_and_what_has_not_run_is_cancelled(client):  # type: ignore[no-untyped-def]
    from marketplace.tasks import lifecycle

    task_id, (first, _second, _third) = stored_task(register(client)["id"], ["a", "b", "c"])
    recorded = lifecycle.fail(claimed(first), node="doors@test", error="broken", seconds=3.0)
    assert recorded.moved
    (task,) = _db("SELECT status, error, backlog FROM tasks WHERE id = :t", t=task_id)
    assert (task.status, task.error, task.backlog) == ("Failed", "subtask 0 failed: broken", 0)
    assert _statuses(task_id) == ["Failed", "Cancelled", "Cancelled"]
    assert _charges(task_id) == [("charge_failed", Decimal("-0.000100"))]  # failed: start_fee


def test_cancel_stops_the_running_and_charges_the_time_they_ran(client):  # type: ignore[no-untyped-def]
    from marketplace.infra.db import session_scope
    from marketplace.tasks import lifecycle

    task_id, (first, _second) = stored_task(register(client)["id"], ["a", "b"])
    work = claimed(first)
    with session_scope() as session:
        assert lifecycle.cancel(session, task=lifecycle.lock_task(session, task_id), actor="user:test")
        assert not lifecycle.stopped(task_id), "the stop signal goes after the commit"
    assert lifecycle.stopped(task_id)
    assert _statuses(task_id) == ["Running", "Cancelled"]
    recorded = lifecycle.stop(work, node="doors@test", seconds=4.0, reason="its task ended")
    assert recorded.moved and recorded.late_charge, "charged after its task was settled"
    from marketplace.billing.service import settle_late_now

    settle_late_now(task_id)
    assert _statuses(task_id) == ["Cancelled", "Cancelled"]
    # 0.0001 start + 4 s x 0.0001, no items: its outputs were never delivered
    assert _charges(task_id) == [("charge_failed", Decimal("-0.000500"))]
    (task,) = _db("SELECT status, cost FROM tasks WHERE id = :t", t=task_id)
    assert (task.status, task.cost) == ("Cancelled", Decimal("0.000500"))


def test_a_retry_sends_a_running_subtask_back_to_pending_with_its_error(client):  # type: ignore[no-untyped-def]
    from marketplace.tasks import lifecycle

    task_id, (sid,) = stored_task(register(client)["id"], ["a"])
    claimed(sid)
    lifecycle.retry(sid, error="flaky")
    (row,) = _db("SELECT status, error, attempts FROM subtasks WHERE id = :s", s=sid)
    assert (row.status, row.error, row.attempts) == ("Pending", "flaky", 1)
    work = claimed(sid)
    assert work.attempts == 2


def test_deferred_work_runs_after_the_commit_and_never_after_a_rollback(stack):  # type: ignore[no-untyped-def]
    from marketplace.infra.after_commit import defer
    from marketplace.infra.db import new_session

    ran: list[str] = []
    session = new_session()
    try:
        defer(session, ran.append, "rolled back")
        session.rollback()
        defer(session, ran.append, "committed")
        with session.begin_nested():
            defer(session, ran.append, "kept savepoint")
        nested = session.begin_nested()
        defer(session, ran.append, "dropped savepoint")
        nested.rollback()
        assert ran == []
        session.commit()
    finally:
        session.close()
    assert ran == ["committed", "kept savepoint"]


def test_release_takes_the_next_subtasks_off_the_backlog_in_index_order(client):  # type: ignore[no-untyped-def]
    from marketplace.infra.db import get_engine, session_scope
    from marketplace.tasks import lifecycle
    from marketplace.tasks.schemas import TaskRequest
    from marketplace.tasks.service import create_task

    user = register(client)
    with session_scope() as session:
        task, _ = create_task(session, user_id=uuid.UUID(user["id"]),
                              request=TaskRequest(model="echo", inputs=list(range(5)), batch_size=1))
    task_id = str(task.id)
    assigned = lifecycle.assign(task_id, model="echo", queues={"cpu": "cpu.generic", "gpu": None, "any": "cpu.generic"})
    assert assigned is not None and assigned[0] == "cpu.generic"
    with get_engine().begin() as conn:
        sent = lifecycle.release(conn, {task_id: 2})
    ids = [r.id for r in _db("SELECT id FROM subtasks WHERE task_id = :t ORDER BY index", t=task_id)]
    assert sent == {task_id: [(f"{ids[0]}:1", 0, 0), (f"{ids[1]}:1", 1, 0)]}  # (message, index, replica)
    (row,) = _db("SELECT status, backlog FROM tasks WHERE id = :t", t=task_id)
    assert (row.status, row.backlog) == ("Scheduled", 3)
    resent = []
    with get_engine().begin() as conn:
        resent = lifecycle.resend(conn, [str(ids[0]), str(ids[4])])  # the second was never sent: not re-sent
    assert resent == [(f"{ids[0]}:2", 0)]

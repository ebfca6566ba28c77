"""What a submit sends to the database: the task, its subtasks and the balance lock in one statement,
the hold and the quota sums in a second, its event and audit record in a third, at commit."""
from __future__ import annotations

from decimal import Decimal

from tests.support.api import register
from tests.support.sql import statements_of


def _executed(statements: list[str]) -> list[str]:
    """The prepared statements run, by name, in order."""
    return [s.split()[1].split("(")[0] for s in statements if s.startswith("EXECUTE ")]


def _assert_recorded(task_id: str) -> None:
    """The submit's TaskCreated event and its task.created audit record were both stored."""
    from sqlalchemy import select

    from marketplace.audit.models import AuditPending, AuditRecord
    from marketplace.events.models import OutboxEvent
    from marketplace.infra.db import session_scope

    with session_scope() as session:
        # (A worker may have scheduled it since: TaskAssigned, task.dispatched.)
        types = session.scalars(select(OutboxEvent.type).where(OutboxEvent.key == task_id)).all()
        actions = [*session.scalars(select(AuditPending.action).where(AuditPending.subject == f"task:{task_id}")),
                   *session.scalars(select(AuditRecord.action).where(AuditRecord.subject == f"task:{task_id}"))]
    assert types.count("TaskCreated") == 1 and actions.count("task.created") == 1, (types, actions)


def test_an_unkeyed_submit_locks_the_balance_in_its_insert(client):  # type: ignore[no-untyped-def]
    from marketplace.tasks.service import _INSERT_TASK

    user = register(client)
    resp, statements = statements_of(lambda: client.post(
        "/v1/tasks", json={"model": "echo", "inputs": [1, 2]}, headers=user["headers"]))
    assert resp.status_code == 202, resp.get_json()
    assert "FOR NO KEY UPDATE" in _INSERT_TASK.sql
    assert _executed(statements) == ["mp_insert_task", "mp_hold_and_sums", "mp_audit_pending_events"]
    _assert_recorded(resp.get_json()["id"])


def test_a_keyed_submit_takes_the_lock_on_its_own_and_both_still_refuse_what_the_balance_cannot_cover(client):  # type: ignore[no-untyped-def]
    from tests.support.accounts import set_user

    user = register(client)
    resp, statements = statements_of(lambda: client.post(
        "/v1/tasks", json={"model": "echo", "inputs": [1]}, headers={**user["headers"], "Idempotency-Key": "k-1"}))
    assert resp.status_code == 202, resp.get_json()
    assert _executed(statements) == ["mp_insert_subtasks", "mp_lock_balance", "mp_hold_and_sums",
                                     "mp_audit_pending_events"]
    _assert_recorded(resp.get_json()["id"])
    set_user(user["id"], balance=Decimal("0"))
    for headers in (user["headers"], {**user["headers"], "Idempotency-Key": "k-2"}):
        refused = client.post("/v1/tasks", json={"model": "echo", "inputs": [1]}, headers=headers)
        assert refused.status_code == 402, refused.get_json()
        assert Decimal(refused.get_json()["balance"]) <= 0


def test_a_big_submit_checks_the_balance_before_its_rows_and_locks_it_after_them(client):  # type: ignore[no-untyped-def]
    """From BIG_SUBMIT_ITEMS items: an unlocked read of what the hold will check, the rows without
    the lock, then place_hold's lock and hold (tests/api/test_api_big_submits.py: why)."""
    from marketplace.tasks.service import BIG_SUBMIT_ITEMS

    user = register(client)
    resp, statements = statements_of(lambda: client.post(
        "/v1/tasks", json={"model": "echo", "inputs": list(range(BIG_SUBMIT_ITEMS))}, headers=user["headers"]))
    assert resp.status_code == 202, resp.get_json()
    assert _executed(statements) == ["mp_hold_check", "mp_insert_task_rows", "mp_lock_balance", "mp_hold_and_sums",
                                     "mp_audit_pending_events"]
    _assert_recorded(resp.get_json()["id"])

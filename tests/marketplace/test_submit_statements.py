"""What a submit sends to the database: the task, its subtasks and the balance lock in one statement."""
from __future__ import annotations

from decimal import Decimal

from tests.support.api import register
from tests.support.sql import statements_of


def _executed(statements: list[str]) -> list[str]:
    """The prepared statements run, by name, in order."""
    return [s.split()[1].split("(")[0] for s in statements if s.startswith("EXECUTE ")]


def test_an_unkeyed_submit_locks_the_balance_in_its_insert(client):  # type: ignore[no-untyped-def]
    from marketplace.tasks.service import _INSERT_TASK

    user = register(client)
    resp, statements = statements_of(lambda: client.post(
        "/v1/tasks", json={"model": "echo", "inputs": [1, 2]}, headers=user["headers"]))
    assert resp.status_code == 202, resp.get_json()
    assert "FOR NO KEY UPDATE" in _INSERT_TASK.sql
    executed = _executed(statements)
    assert executed[:2] == ["mp_insert_task", "mp_hold_and_sums"], executed
    assert "mp_lock_balance" not in executed


def test_a_keyed_submit_takes_the_lock_on_its_own_and_both_still_refuse_what_the_balance_cannot_cover(client):  # type: ignore[no-untyped-def]
    from tests.support.accounts import set_user

    user = register(client)
    resp, statements = statements_of(lambda: client.post(
        "/v1/tasks", json={"model": "echo", "inputs": [1]}, headers={**user["headers"], "Idempotency-Key": "k-1"}))
    assert resp.status_code == 202, resp.get_json()
    assert _executed(statements)[:3] == ["mp_insert_subtasks", "mp_lock_balance", "mp_hold_and_sums"]
    set_user(user["id"], balance=Decimal("0"))
    for headers in (user["headers"], {**user["headers"], "Idempotency-Key": "k-2"}):
        refused = client.post("/v1/tasks", json={"model": "echo", "inputs": [1]}, headers=headers)
        assert refused.status_code == 402, refused.get_json()
        assert Decimal(refused.get_json()["balance"]) <= 0

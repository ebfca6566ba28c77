"""The daily spend quota reads one `daily_spend` row per user and day, kept by settlement."""
from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal

from sqlalchemy import select, update

from tests.support.accounts import set_user
from tests.support.api import register
from tests.support.progress import ran


def _daily(user_id: str) -> dict:  # type: ignore[type-arg]
    from marketplace.billing.models import DailySpend
    from marketplace.infra.db import session_scope

    with session_scope() as session:
        rows = session.scalars(select(DailySpend).where(DailySpend.user_id == uuid.UUID(user_id)))
        return {row.day: row.charged for row in rows}


def test_settlement_adds_each_charge_to_the_day_it_was_recorded(client):  # type: ignore[no-untyped-def]
    from marketplace.billing import quotas, service
    from marketplace.billing.models import LedgerEntry
    from marketplace.infra.db import session_scope
    from marketplace.results.service import finalize_task
    from marketplace.tasks.models import Task

    user = register(client)
    task_id, sub_ids = ran(user["id"], ["a", "b", "c"])
    with session_scope() as session:  # charged with their outcomes, one of them (say) just before midnight
        session.execute(update(LedgerEntry).where(LedgerEntry.subtask_id == uuid.UUID(sub_ids[0]))
                        .values(created_at=quotas.today_start() - timedelta(seconds=1)))
    assert _daily(user["id"]) == {}  # nothing settled yet: the hold covers the running task

    assert finalize_task(task_id) == "done"
    with session_scope() as session:
        cost = session.get(Task, uuid.UUID(task_id)).cost
        amounts = {row.subtask_id: -row.amount for row in session.scalars(
            select(LedgerEntry).where(LedgerEntry.task_id == uuid.UUID(task_id)))}
    today = quotas.today_start().date()
    first = amounts[uuid.UUID(sub_ids[0])]
    assert _daily(user["id"]) == {today - timedelta(days=1): first, today: cost - first}

    # A second task adds to today's row, and settling again adds nothing.
    second_id, _ = ran(user["id"], ["d"])
    assert finalize_task(second_id) == "done"
    assert finalize_task(second_id) == "noop"
    with session_scope() as session:
        second_cost = session.get(Task, uuid.UUID(second_id)).cost
        service.settle_task(session, task=session.get(Task, uuid.UUID(second_id)))
    assert _daily(user["id"])[today] == cost - first + second_cost


def test_the_submit_checks_the_days_row_not_the_ledger(client):  # type: ignore[no-untyped-def]
    from marketplace.billing.models import DailySpend
    from marketplace.infra.db import session_scope

    user = register(client)
    set_user(user["id"], daily_spend_limit=Decimal("1"))
    with session_scope() as session:  # what settlement would have written after 0.999 credits of work today
        from marketplace.billing import quotas

        session.add(DailySpend(user_id=uuid.UUID(user["id"]), day=quotas.today_start().date(),
                               charged=Decimal("0.999")))
    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": [1]}, headers=user["headers"])
    assert resp.status_code == 429, resp.get_json()
    body = resp.get_json()
    assert body["quota"] == "daily_spend_limit" and body["spent"] == "0.999000", body
    set_user(user["id"], daily_spend_limit=Decimal("2"))
    assert client.post("/v1/tasks", json={"model": "echo", "inputs": [1]},
                       headers=user["headers"]).status_code == 202


def test_settlement_updates_the_balance_of_a_user_the_session_already_loaded(client):  # type: ignore[no-untyped-def]
    """Settlement moves the balance in raw SQL (one statement with the ledger and the hold); a
    User the same session loaded (an API request's caller) must not keep the old balance."""
    from marketplace.billing import service
    from marketplace.infra.db import session_scope
    from marketplace.tasks.models import Task
    from marketplace.users.models import User

    user = register(client)
    task_id, _ = ran(user["id"], ["a", "b"])
    with session_scope() as session:
        me = session.get(User, uuid.UUID(user["id"]))
        before = me.balance
        cost = service.settle_task(session, task=session.get(Task, uuid.UUID(task_id)))
        assert cost > 0
        assert me.balance == before - cost
    with session_scope() as session:
        assert session.get(User, uuid.UUID(user["id"])).balance == before - cost

"""Billing under concurrency, on real Postgres: a charge racing settlement, a balance changing under a submit."""
from __future__ import annotations

import threading
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select, update

from tests.support.api import register
from tests.support.progress import ran
from tests.support.wait import backends_waiting_on_locks, wait_until


def test_a_charge_landing_while_finalize_settles_is_applied_once_and_never_deadlocks(client):  # type: ignore[no-untyped-def]
    from marketplace.billing import service
    from marketplace.billing.models import Hold, LedgerEntry
    from marketplace.infra.db import new_session, session_scope
    from marketplace.results.service import finalize_task
    from marketplace.tasks.models import Task

    user = register(client)
    task_id, sub_ids = ran(user["id"], ["a", "b"])  # each charged with its outcome
    tid = uuid.UUID(task_id)

    # Another charge of the task mid-flight (a stopped copy's, say): it holds the hold FOR SHARE and
    # has not inserted its ledger row yet. Finalize starts now and must settle it exactly once.
    handler = new_session()
    handler.execute(select(Hold.id).where(Hold.task_id == tid).with_for_update(read=True))
    outcome: dict[str, Any] = {}

    def run_finalize() -> None:
        try:
            outcome["result"] = finalize_task(task_id)
        except Exception as exc:  # a deadlock victim lands here
            outcome["error"] = exc

    thread = threading.Thread(target=run_finalize)
    thread.start()
    try:
        wait_until(backends_waiting_on_locks, 15, "finalize waiting on the handler's lock", interval=0.05)
        # Finalize waits to lock the hold FOR UPDATE; this insert must not wait on finalize (a
        # deadlock Postgres would break by killing one of them).
        inserted = service.record_subtask_charge(
            handler, user_id=uuid.UUID(user["id"]), task_id=tid, subtask_id=uuid.UUID(sub_ids[0]),
            amount=Decimal("0.25"), ok=False, detail="the late charge",
        )
        handler.commit()
    finally:
        handler.close()
        thread.join(30)
    assert outcome == {"result": "done"}, outcome
    assert inserted

    with session_scope() as session:
        charges = list(session.scalars(select(LedgerEntry).where(LedgerEntry.task_id == tid)))
        task = session.get(Task, tid)
        hold = session.scalar(select(Hold).where(Hold.task_id == tid))
        assert sorted((str(c.subtask_id), c.kind) for c in charges) == sorted(
            [(sub_ids[0], "charge"), (sub_ids[1], "charge"), (sub_ids[0], "charge_failed")]), "each charge once"
        assert [c.amount for c in charges if c.kind == "charge_failed"] == [Decimal("-0.25")]
        assert all(c.settled for c in charges)
        assert task.cost == -sum(c.amount for c in charges), "the late charge is in the settled cost"
        assert hold.status == "released"


def test_the_hold_checks_the_balance_read_under_the_lock_not_the_one_loaded_before(client):  # type: ignore[no-untyped-def]
    from marketplace.infra.db import new_session, session_scope
    from marketplace.infra.errors import PaymentRequired
    from marketplace.tasks.schemas import TaskRequest
    from marketplace.tasks.service import create_task
    from marketplace.users.models import User

    user = register(client)
    uid = uuid.UUID(user["id"])
    session = new_session()  # the request's session: it loads the user first (the JWT lookup does)
    try:
        loaded = session.get(User, uid)  # held, as flask-jwt-extended's current_user holds it for the request
        assert loaded is not None and loaded.balance > Decimal("1")
        with session_scope() as other:  # meanwhile a settlement spends almost everything
            other.execute(update(User).where(User.id == uid).values(balance=Decimal("0.000001")))
        with pytest.raises(PaymentRequired):
            create_task(session, user_id=uid, request=TaskRequest(model="echo", inputs=["a"]))
    finally:
        session.rollback()
        session.close()


def test_a_late_charge_whose_settlement_was_lost_is_settled_by_recovery(client):  # type: ignore[no-untyped-def]
    from marketplace.billing import service
    from marketplace.billing.models import LedgerEntry
    from marketplace.infra.db import session_scope, utcnow
    from marketplace.results.service import finalize_task
    from marketplace.scheduling.recovery import recover_stalled
    from marketplace.tasks.models import Task
    from marketplace.users.models import User

    user = register(client)
    task_id, sub_ids = ran(user["id"], ["a", "b"])
    assert finalize_task(task_id) == "done"  # settles both subtasks' charges, releases the hold
    tid, uid = uuid.UUID(task_id), uuid.UUID(user["id"])
    with session_scope() as session:
        balance, cost = session.get(User, uid).balance, session.get(Task, tid).cost

    # A charge lands after settlement (a stopped copy's, say), and its process dies before
    # settle_late: the row is committed, unsettled, and the balance never saw it.
    with session_scope() as session:
        assert service.record_subtask_charge(session, user_id=uid, task_id=tid, subtask_id=uuid.UUID(sub_ids[0]),
                                             amount=Decimal("0.5"), ok=False, detail="late")
        assert session.info.pop(service.LATE_KEY) == {tid}, "it is known late, for settle_late"
    with session_scope() as session:
        session.execute(update(LedgerEntry).where(LedgerEntry.task_id == tid, LedgerEntry.kind == "charge_failed")
                        .values(created_at=utcnow() - timedelta(hours=1)))
        assert session.get(User, uid).balance == balance

    assert recover_stalled()["settled"] == [task_id]
    with session_scope() as session:
        late = session.scalar(select(LedgerEntry).where(LedgerEntry.task_id == tid, LedgerEntry.kind == "charge_failed"))
        assert late.settled
        assert session.get(User, uid).balance == balance - Decimal("0.5")
        assert session.get(Task, tid).cost == cost + Decimal("0.5")
    assert recover_stalled()["settled"] == [], "settled once"


def test_concurrent_top_ups_of_an_admins_own_account_all_count(app, admin):  # type: ignore[no-untyped-def]
    """The request's user row was in the session already, and the locked read handed back that
    object with its stale balance: 8 threads x 25 top-ups of 1 credit to oneself left 38 of 200."""
    from tests.support.accounts import balance_of

    before = balance_of(admin["id"])
    errors: list[str] = []

    def top_ups() -> None:
        c = app.test_client()
        for _ in range(10):
            resp = c.post("/v1/billing/topup", json={"user_id": admin["id"], "amount": "1"}, headers=admin["headers"])
            if resp.status_code != 201:
                errors.append(f"{resp.status_code} {resp.get_json()}")

    threads = [threading.Thread(target=top_ups) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]
    assert balance_of(admin["id"]) == before + Decimal(60)

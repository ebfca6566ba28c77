"""Billing: estimates and holds at submit, per-subtask charges, settlement at the end.

Charges never touch the balance row: a subtask inserts one ledger row (unique per
subtask and kind) and moves on, so subtasks of one user never wait on each other.
The balance moves once per task, at settlement, under the user's row lock.
"""
from __future__ import annotations

import uuid
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from marketplace.billing.models import Hold, LedgerEntry
from marketplace.catalog import ModelSpec, Price
from marketplace.db import utcnow
from marketplace.errors import PaymentRequired
from marketplace.settings import get_settings
from marketplace.users.models import User

CENT = Decimal("0.000001")


def q(amount: Decimal) -> Decimal:
    return amount.quantize(CENT, rounding=ROUND_HALF_UP)


def price_for(spec: ModelSpec, device: str) -> Price:
    return spec.price[device]  # type: ignore[index]


def subtask_cost(price: Price, *, seconds: float, items: int, ok: bool) -> Decimal:
    """Start fee + seconds × price + items × price; failed subtasks per the price card."""
    full = price.start_fee + Decimal(str(round(seconds, 6))) * price.per_second + items * price.per_item
    if ok or price.failed == "full":
        return q(full)
    if price.failed == "start_fee":
        return q(price.start_fee)
    return Decimal("0")


def estimate_cost(spec: ModelSpec, device: str, batch_items: list[int]) -> Decimal:
    """The most a task can cost: every subtask running to its time limit."""
    price = price_for(spec, device)
    per_subtask = price.start_fee + Decimal(str(spec.time_limit)) * price.per_second
    return q(per_subtask * len(batch_items) + price.per_item * sum(batch_items))


def grant_signup_credits(session: Session, *, user: User) -> None:
    amount = q(Decimal(get_settings().signup_credits))
    if amount <= 0:
        return
    session.add(LedgerEntry(user_id=user.id, kind="signup", amount=amount, settled=True))
    user.balance = (user.balance or Decimal("0")) + amount


def held_amount(session: Session, *, user_id: uuid.UUID) -> Decimal:
    total = session.scalar(
        select(func.coalesce(func.sum(Hold.amount), 0)).where(Hold.user_id == user_id, Hold.status == "active")
    )
    return Decimal(total or 0)


def available_balance(session: Session, *, user: User) -> Decimal:
    return q(user.balance - held_amount(session, user_id=user.id))


def place_hold(session: Session, *, user_id: uuid.UUID, task_id: uuid.UUID, amount: Decimal) -> Hold:
    """Reserve `amount` for a task, or refuse with 402 naming balance and estimate."""
    user = session.execute(select(User).where(User.id == user_id).with_for_update()).scalar_one()
    available = available_balance(session, user=user)
    if amount > available:
        raise PaymentRequired(
            f"estimated cost {amount} exceeds available balance {available}",
            balance=str(available),
            estimate=str(amount),
        )
    hold = Hold(user_id=user_id, task_id=task_id, amount=q(amount))
    session.add(hold)
    return hold


def record_subtask_charge(
    session: Session,
    *,
    user_id: uuid.UUID,
    task_id: uuid.UUID,
    subtask_id: uuid.UUID,
    amount: Decimal,
    ok: bool,
    detail: str | None = None,
) -> bool:
    """Insert the subtask's charge once; False when it was already charged (redelivery)."""
    kind = "charge" if ok else "charge_failed"
    stmt = (
        pg_insert(LedgerEntry)
        .values(
            user_id=user_id, task_id=task_id, subtask_id=subtask_id, kind=kind,
            amount=-q(amount), detail=detail, settled=False, created_at=utcnow(),
        )
        .on_conflict_do_nothing(constraint="uq_ledger_subtask_kind")
        .returning(LedgerEntry.id)
    )
    return session.execute(stmt).first() is not None


def task_charges(session: Session, *, task_id: uuid.UUID) -> Decimal:
    total = session.scalar(
        select(func.coalesce(func.sum(LedgerEntry.amount), 0)).where(
            LedgerEntry.task_id == task_id, LedgerEntry.kind.in_(("charge", "charge_failed"))
        )
    )
    return q(-Decimal(total or 0))


def settle_task(session: Session, *, task: Any) -> Decimal:
    """Apply the task's unsettled charges to the balance and release its hold; idempotent."""
    user = session.execute(select(User).where(User.id == task.user_id).with_for_update()).scalar_one()
    unsettled = session.scalar(
        select(func.coalesce(func.sum(LedgerEntry.amount), 0)).where(
            LedgerEntry.task_id == task.id, LedgerEntry.settled.is_(False)
        )
    )
    delta = Decimal(unsettled or 0)
    # The hold covered the worst case, so this stays >= 0; the max() is the last guard.
    user.balance = max(Decimal("0"), q(user.balance + delta))
    session.execute(
        update(LedgerEntry)
        .where(LedgerEntry.task_id == task.id, LedgerEntry.settled.is_(False))
        .values(settled=True)
    )
    session.execute(
        update(Hold)
        .where(Hold.task_id == task.id, Hold.status == "active")
        .values(status="released", released_at=utcnow())
    )
    task.cost = task_charges(session, task_id=task.id)
    return task.cost


def backfill_charges(session: Session, *, task: Any, spec: ModelSpec | None) -> int:
    """Record charges for final subtasks that have none yet (the signal may not have run yet).

    Celery fires task_success after the chord counter moved, so the callback can
    reach settlement before the last subtask's signal handler; both paths compute
    the same amount from the same numbers, and the unique constraint keeps one row.
    """
    from marketplace.tasks.models import SubTask, SubTaskStatus

    if spec is None or not task.queue:
        return 0
    price = price_for(spec, task.queue.split(".", 1)[0])
    charged = set(session.scalars(select(LedgerEntry.subtask_id).where(LedgerEntry.task_id == task.id)))
    added = 0
    for sub in session.scalars(
        select(SubTask).where(
            SubTask.task_id == task.id,
            SubTask.status.in_((SubTaskStatus.DONE.value, SubTaskStatus.FAILED.value)),
            SubTask.attempts > 0,
        )
    ):
        if sub.id in charged:
            continue
        ok = sub.status == SubTaskStatus.DONE.value
        amount = subtask_cost(price, seconds=sub.seconds or 0.0, items=sub.items, ok=ok)
        added += record_subtask_charge(
            session, user_id=task.user_id, task_id=task.id, subtask_id=sub.id, amount=amount, ok=ok,
            detail=f"{spec.name}/{task.queue} {sub.items} items {sub.seconds or 0:.3f}s",
        )
    return added

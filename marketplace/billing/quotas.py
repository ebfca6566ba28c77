"""Per-user quotas, checked at submit: active tasks, items per task, spend per day (429 naming the quota)."""
from __future__ import annotations

import uuid
from datetime import UTC, datetime, time
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from marketplace.infra.errors import QuotaExceeded
from marketplace.settings import get_settings
from marketplace.tasks.models import ACTIVE_TASK_STATUSES, Task
from marketplace.users.models import User


def effective_quotas(user: User) -> dict[str, object]:
    settings = get_settings()
    return {
        "max_active_tasks": user.max_active_tasks if user.max_active_tasks is not None else settings.default_max_active_tasks,
        "max_items_per_task": (
            user.max_items_per_task if user.max_items_per_task is not None else settings.default_max_items_per_task
        ),
        "daily_spend_limit": str(
            user.daily_spend_limit if user.daily_spend_limit is not None else settings.default_daily_spend
        ),
        # The fair dispatcher's (scheduling/fair.py): subtasks in flight per queue (None: no cap), and
        # the user's weight in the sharing of the nodes.
        "max_running_subtasks": (user.max_running_subtasks if user.max_running_subtasks is not None
                                 else settings.default_max_running_subtasks),
        "share": user.share if user.share is not None else 1.0,
    }


def active_tasks_count(user_id: Any) -> Any:
    """The number of the user's active tasks, as a SELECT (for a scalar subquery)."""
    return select(func.count()).select_from(Task).where(
        Task.user_id == user_id, Task.status.in_([s.value for s in ACTIVE_TASK_STATUSES])
    )


def active_tasks(session: Session, *, user_id: uuid.UUID) -> int:
    return session.scalar(active_tasks_count(user_id)) or 0


def check_submit(session: Session, *, user_id: uuid.UUID, items: int) -> None:
    """Raise QuotaExceeded when a new task of `items` items is over the per-task limit.

    The active-task and daily-spend quotas are checked once, exactly, under the
    user's row lock in `billing.service.place_hold`; the transaction rolls back on refusal.
    """
    user = session.get(User, user_id)
    if user is None:
        return
    quotas = effective_quotas(user)
    if items > int(quotas["max_items_per_task"]):  # type: ignore[arg-type]
        raise QuotaExceeded(
            f"quota max_items_per_task: {items} items exceeds {quotas['max_items_per_task']}",
            quota="max_items_per_task", limit=quotas["max_items_per_task"],
        )


def check_active_tasks(user: User, *, active: int) -> None:
    """QuotaExceeded (max_active_tasks) when `active` other tasks already use up the quota."""
    limit = int(effective_quotas(user)["max_active_tasks"])  # type: ignore[arg-type]
    if active >= limit:
        raise QuotaExceeded(
            f"quota max_active_tasks: {active} tasks are still active (limit {limit})",
            quota="max_active_tasks", limit=limit,
        )


def today_start() -> datetime:
    return datetime.combine(datetime.now(UTC).date(), time.min, tzinfo=UTC)


def charges_today_sum(user_id: Any) -> Any:
    """The (negative) sum of the user's charges recorded today (UTC), settled or not, as a SELECT.

    For `GET /v1/me`; the submit's quota check reads the day's `daily_spend` row instead (one row
    kept by settlement, in `billing.service._HOLD_AND_SUMS`)."""
    from marketplace.billing.models import LedgerEntry

    return select(func.coalesce(func.sum(LedgerEntry.amount), 0)).where(
        LedgerEntry.user_id == user_id,
        LedgerEntry.kind.in_(("charge", "charge_failed")),
        LedgerEntry.created_at >= today_start(),
    )


def spent_today(session: Session, *, user_id: uuid.UUID) -> Decimal:
    """Charges recorded today (UTC), running tasks included."""
    from marketplace.billing.money import q

    return q(-Decimal(session.scalar(charges_today_sum(user_id)) or 0))


def check_daily_spend(*, user: User, amount: Decimal, held: Decimal, settled_today: Decimal) -> None:
    """Raise QuotaExceeded (daily_spend_limit) when a new hold of `amount` would pass the limit.

    What counts against the limit is today's settled charges plus the active holds: a
    running task's charges are covered by its hold, so only settled charges are added
    (no double counting). `place_hold` reads both under the user's row lock.
    """
    from marketplace.billing.money import q

    limit = Decimal(str(effective_quotas(user)["daily_spend_limit"]))
    committed = q(settled_today + held)
    if committed + amount > limit:
        raise QuotaExceeded(
            f"quota daily_spend_limit: {committed} spent or held today + estimate {amount} exceeds {limit}",
            quota="daily_spend_limit", limit=str(limit), spent=str(committed), estimate=str(amount),
        )


def usage(session: Session, *, user_id: uuid.UUID) -> dict[str, Any]:
    """`{active_tasks, spent_today}` for `GET /v1/me` (money as a decimal string)."""
    return {
        "active_tasks": active_tasks(session, user_id=user_id),
        "spent_today": str(spent_today(session, user_id=user_id)),
    }

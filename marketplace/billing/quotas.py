"""Per-user quotas, checked at submit: active tasks and items per task."""
from __future__ import annotations

import uuid

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from marketplace.errors import QuotaExceeded
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
    }


def active_tasks(session: Session, *, user_id: uuid.UUID) -> int:
    return session.scalar(
        select(func.count()).select_from(Task).where(
            Task.user_id == user_id, Task.status.in_([s.value for s in ACTIVE_TASK_STATUSES])
        )
    ) or 0


def check_submit(session: Session, *, user_id: uuid.UUID, items: int) -> None:
    """Raise QuotaExceeded naming the quota a new task of `items` items would break."""
    user = session.get(User, user_id)
    if user is None:
        return
    quotas = effective_quotas(user)
    if items > int(quotas["max_items_per_task"]):  # type: ignore[arg-type]
        raise QuotaExceeded(
            f"quota max_items_per_task: {items} items exceeds {quotas['max_items_per_task']}",
            quota="max_items_per_task", limit=quotas["max_items_per_task"],
        )
    active = active_tasks(session, user_id=user_id)
    if active >= int(quotas["max_active_tasks"]):  # type: ignore[arg-type]
        raise QuotaExceeded(
            f"quota max_active_tasks: {active} tasks are still active (limit {quotas['max_active_tasks']})",
            quota="max_active_tasks", limit=quotas["max_active_tasks"],
        )

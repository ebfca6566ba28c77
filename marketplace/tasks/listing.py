"""Listing and cancelling tasks (REST and gRPC call these)."""
from __future__ import annotations

import base64
import binascii
import json
import logging
import uuid
from datetime import datetime

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from marketplace.billing import service as billing
from marketplace.infra.errors import Conflict, InvalidInput
from marketplace.tasks import lifecycle
from marketplace.tasks.models import Task, TaskStatus
from marketplace.tasks.schemas import TaskOut
from marketplace.tasks.service import get_task, progress_of, task_document
from marketplace.users.models import User

logger = logging.getLogger(__name__)


def encode_cursor(task: Task) -> str:
    raw = json.dumps([task.created_at.isoformat(), str(task.id)], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, tid = json.loads(raw)
        if not isinstance(created, str) or not isinstance(tid, str):  # uuid.UUID(123) is an AttributeError
            raise ValueError("not a cursor")
        return datetime.fromisoformat(created), uuid.UUID(tid)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise InvalidInput.field("cursor", "not a cursor returned by this endpoint") from None


def list_tasks(
    session: Session, *, user: User, status: str | None = None, limit: int = 20, cursor: str | None = None,
    all_users: bool = False,
) -> tuple[list[TaskOut], str | None]:
    """A page of tasks, newest first (keyset on created_at, id); the caller's own unless an admin asks for all."""
    stmt = select(Task)
    if not (all_users and user.is_admin):
        stmt = stmt.where(Task.user_id == user.id)
    if status:
        stmt = stmt.where(Task.status == status)
    if cursor:
        created, tid = decode_cursor(cursor)
        stmt = stmt.where(tuple_(Task.created_at, Task.id) < tuple_(created, tid))
    rows = list(session.scalars(stmt.order_by(Task.created_at.desc(), Task.id.desc()).limit(limit + 1)))
    page, more = rows[:limit], len(rows) > limit
    counts = progress_of(session, task_ids=[t.id for t in page]) if page else {}
    docs = [
        task_document(t, counts[t.id], running_cost=None if t.cost is not None else billing.task_charges(
            session, task_id=t.id))
        for t in page
    ]
    return docs, (encode_cursor(page[-1]) if more else None)


def cancel_task(session: Session, *, task_id: uuid.UUID | str, user: User) -> Task:
    """End an active task `Cancelled` (its owner or an admin); idempotent; Conflict once Done or
    Failed. What has not run never will; what runs is stopped by its node within a second or so
    (`lifecycle.finish`); what ran stays charged."""
    task = get_task(session, task_id=task_id, user=user, lock=True)
    if TaskStatus(task.status).final and task.status != TaskStatus.CANCELLED.value:
        raise Conflict(f"task {task.id} is already {task.status}; only active tasks can be cancelled",
                       task_status=task.status)
    lifecycle.cancel(session, task=task, actor=f"user:{user.id}")
    return task

"""Write domain events into the outbox, inside the caller's transaction."""
from __future__ import annotations

from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from marketplace.db import utcnow
from marketplace.events.models import OutboxEvent
from marketplace.settings import get_settings

TASK_EVENTS = ("TaskCreated", "TaskAssigned", "TaskCompleted", "TaskFailed", "TaskCancelled")
SUBTASK_EVENTS = ("SubTaskCompleted",)


def topic_for(event_type: str) -> str:
    settings = get_settings()
    if event_type in SUBTASK_EVENTS:
        return settings.topic_subtasks
    if event_type == "AuditEvent":
        return settings.topic_audit
    return settings.topic_tasks


def emit(session: Session, *, type: str, key: str, payload: dict[str, Any]) -> None:
    """Add an event; it is relayed to Kafka only if the surrounding transaction commits."""
    emit_many(session, type=type, events=[(key, payload)])


def emit_many(session: Session, *, type: str, events: list[tuple[str, dict[str, Any]]]) -> None:
    """Add events of one type, `(key, payload)` each, in one INSERT."""
    if not events:
        return
    # A Core insert on the table, not session.add(): no unit-of-work bookkeeping for rows nobody reads back.
    topic, now = topic_for(type), utcnow()
    session.execute(insert(OutboxEvent.__table__), [
        {"topic": topic, "key": key, "type": type, "payload": payload, "created_at": now} for key, payload in events
    ])

"""Write domain events into the outbox, inside the caller's transaction."""
from __future__ import annotations

import json
from typing import Any

from sqlalchemy.orm import Session

from marketplace.db import utcnow
from marketplace.prepared import Prepared
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


# One statement for any number of events of a type, prepared once per connection: the Core
# insert it replaced took ~0.2 ms of Python per call (0.1 now), on the submit's path and the
# callback's. The rows are inserted, and so numbered, in the order given.
_EMIT = Prepared("mp_emit", """
    INSERT INTO outbox_events (topic, key, type, payload, created_at)
    SELECT :topic, e.value->>0, :type, e.value->1, :now
    FROM jsonb_array_elements(:events) WITH ORDINALITY AS e ORDER BY e.ordinality
""", types={"topic": "text", "type": "text", "now": "timestamptz", "events": "jsonb"})


def emit_many(session: Session, *, type: str, events: list[tuple[str, dict[str, Any]]]) -> None:
    """Add events of one type, `(key, payload)` each, in one INSERT."""
    if not events:
        return
    # On the session's connection, without a flush: nothing here reads what the session holds.
    _EMIT.execute(session.connection(), {"topic": topic_for(type), "type": type, "now": utcnow(),
                                         "events": json.dumps(events)})

"""Write domain events into the outbox, in the caller's transaction, at its commit."""
from __future__ import annotations

import json
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session

from marketplace.infra.db import take_buffer, transaction_buffer, utcnow
from marketplace.infra.prepared import Prepared
from marketplace.settings import get_settings

TASK_EVENTS = ("TaskCreated", "TaskAssigned", "TaskStarted", "TaskCompleted", "TaskFailed", "TaskCancelled")
FINAL_TASK_EVENTS = {"TaskCompleted": "Done", "TaskFailed": "Failed", "TaskCancelled": "Cancelled"}
SUBTASK_EVENTS = ("SubTaskCompleted", "SubTaskVerified")


def topic_for(event_type: str) -> str:
    settings = get_settings()
    if event_type in SUBTASK_EVENTS:
        return settings.topic_subtasks
    if event_type in ("AuditEvent", "AuditCheckpoint"):
        return settings.topic_audit
    return settings.topic_tasks


def emit(session: Session, *, type: str, key: str, payload: dict[str, Any]) -> None:
    """Add an event; it is relayed to Kafka only if the surrounding transaction commits."""
    emit_many(session, type=type, events=[(key, payload)])


# Events wait in the session and are written at its commit, in one statement with the
# transaction's buffered audit records (`audit.service._chain_on_commit`): a submit and a
# finalize each wrote the two in two round trips. Whatever that hook leaves (a transaction
# without audit records, the chain's own AuditEvents) `_write_on_commit` writes after it. They
# go with a transaction that ends without a commit, or a savepoint rolled back
# (`db.transaction_buffer`). Each row is encoded at `emit`, so a payload that is not JSON fails
# there, not in the commit.
_DEFERRED = "marketplace.outbox"
# The statement that writes them, from a JSON array of [topic, key, type, payload, created_at]
# (rows keep the order given, so ids follow it); `:events` is its one parameter.
INSERT_EVENTS_SQL = """
    INSERT INTO outbox_events (topic, key, type, payload, created_at)
    SELECT e.value->>0, e.value->>1, e.value->>2, e.value->3, CAST(e.value->>4 AS timestamptz)
    FROM jsonb_array_elements(:events) WITH ORDINALITY AS e ORDER BY e.ordinality
"""
EVENTS_TYPE = "jsonb"
_EMIT = Prepared("mp_emit", INSERT_EVENTS_SQL, types={"events": EVENTS_TYPE})


def emit_many(session: Session, *, type: str, events: list[tuple[str, dict[str, Any]]]) -> None:
    """Add events of one type, `(key, payload)` each, written at commit in the order given."""
    if not events:
        return
    topic, now = topic_for(type), utcnow().isoformat()
    transaction_buffer(session, _DEFERRED).extend(
        json.dumps([topic, key, type, payload, now], separators=(",", ":")) for key, payload in events)


def take_deferred(session: Session) -> str | None:
    """The session's events not written yet, as `:events` for `INSERT_EVENTS_SQL` (None if none);
    the caller writes them in this transaction."""
    rows = take_buffer(session, _DEFERRED)
    return f"[{','.join(rows)}]" if rows else None


@event.listens_for(Session, "before_commit")
def _write_on_commit(session: Session) -> None:
    events = take_deferred(session)
    if events:
        _EMIT.execute(session.connection(), {"events": events})

"""A task's live progress as Server-Sent Events (`GET /v1/tasks/<id>/events`).

Events, each with its outbox id as the SSE `id` (increasing: `Last-Event-ID` resumes after it):

- `status`: the task moved (`Created`, `Scheduled`, `InProgress`), with the event's payload;
- `subtask`: a subtask ended (Done, Failed or Cancelled while it ran), with its outputs when
  asked (`outputs=true`);
- `task`: the task ended; its data is the task document (`GET /v1/tasks/<id>`), and the stream
  ends. A cancelled task's running subtasks are stopped and charged afterwards: the document
  waits for that (at most `billing.SETTLE_WAIT_SECONDS`), so its cost is the settled one.

A quiet stream gets a comment line every `event_stream_heartbeat` seconds. Live rows come from
the process's one outbox reader (`events.feed`); the rows before the stream opened, from one read.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from marketplace.events.feed import Event, Feed, Subscription, get_feed, task_events
from marketplace.events.outbox import FINAL_TASK_EVENTS
from marketplace.infra.db import session_scope

STATUS_OF = {"TaskCreated": "Created", "TaskAssigned": "Scheduled", "TaskStarted": "InProgress"}
PRUNED_WAIT_S = 10.0  # an ended task's final event not read yet: how long the feed may take to bring it
RETRY_MS = 2000
GONE_CHECK_S = 1.0  # how often a stream looks whether its client is still there  # how soon an EventSource reconnects after a dropped connection
_PRIVATE = ("user_id", "result_key", "result_sha256")  # storage details and the owner's id


def frame(event: str, data: Any, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def open_stream(*, task_id: uuid.UUID, feed: Feed | None = None) -> Subscription:
    """Join the feed (before the read of what came earlier, so nothing falls between the two).
    Raises `events.feed.TooManyStreams` when this process holds as many as it may."""
    return (feed or get_feed()).subscribe(str(task_id))


def stream(*, task_id: uuid.UUID, sub: Subscription, after: int, outputs: bool, heartbeat: float,
           feed: Feed | None = None, gone: Callable[[], bool] = lambda: False) -> Iterator[str]:
    """The SSE text of task `task_id` from event id `after` on, ending with its document.

    `gone()`: whether the client hung up, asked every second or so (a write would tell only at the
    next heartbeat, and the stream's thread and slot stay taken till then)."""
    from marketplace.billing.service import SETTLE_WAIT_SECONDS

    feed = feed or get_feed()
    try:
        yield f"retry: {RETRY_MS}\n\n"
        pending = task_events(key=str(task_id), after=after, upto=sub.since)
        # Ended already, its final event not among those read: it comes from the feed, or it was
        # pruned with the task's other events (`outbox_retention_hours`) and the document goes alone.
        ended_at = time.monotonic() if _final_status(task_id) else None
        final: Event | None = None
        settle_until = 0.0
        quiet_since = time.monotonic()
        while True:
            for event in pending:
                if event.type in FINAL_TASK_EVENTS:
                    final = event
                    settle_until = time.monotonic() + SETTLE_WAIT_SECONDS
                else:
                    yield _event_frame(task_id, event, outputs=outputs)
            if pending:
                quiet_since = time.monotonic()
            if final is not None and (time.monotonic() > settle_until or not _settling(task_id)):
                yield from _document(task_id, event_id=final.id)
                return
            if final is None and ended_at is not None and time.monotonic() - ended_at > PRUNED_WAIT_S:
                yield from _document(task_id, event_id=max(after, sub.since))
                return
            if sub.closed or gone():
                return  # the process is stopping (the client resumes from its last id elsewhere), or the client left
            pending = sub.get(timeout=min(heartbeat, GONE_CHECK_S))
            if not pending and time.monotonic() - quiet_since >= heartbeat:
                quiet_since = time.monotonic()
                yield ": keep-alive\n\n"
    finally:
        feed.unsubscribe(sub)


def _event_frame(task_id: uuid.UUID, event: Event, *, outputs: bool) -> str:
    data = {k: v for k, v in event.payload.items() if k not in _PRIVATE}
    if event.type in STATUS_OF:
        return frame("status", {**data, "task_id": str(task_id), "status": STATUS_OF[event.type]}, event.id)
    if outputs and event.payload.get("status") == "Done" and event.payload.get("result_key"):
        from marketplace.infra.storage import get_store

        data["outputs"] = json.loads(get_store().get_bytes(event.payload["result_key"]))
    return frame("subtask", data, event.id)


def _final_status(task_id: uuid.UUID) -> bool:
    from marketplace.tasks.models import Task, TaskStatus

    with session_scope() as session:
        task = session.get(Task, task_id)
        return task is not None and TaskStatus(task.status).final


def _settling(task_id: uuid.UUID) -> bool:
    """Whether the ended task's cost may still change (its stopped subtasks not charged yet)."""
    from marketplace.billing import service as billing

    with session_scope() as session:
        return billing.still_settling(session, task_id=task_id)


def _document(task_id: uuid.UUID, *, event_id: int) -> Iterator[str]:
    from marketplace.tasks.service import describe_task, get_task

    with session_scope() as session:
        doc = describe_task(session, task=get_task(session, task_id=task_id)).model_dump(mode="json")
    yield frame("task", doc, event_id)


def has_events_after(*, task_id: uuid.UUID, after: int) -> bool:
    """Whether a task has stream events past `after` (a finished stream's client reconnecting has not)."""
    from marketplace.events.feed import STREAM_TYPES

    with session_scope() as session:
        from sqlalchemy import text

        return bool(session.scalar(text(
            "SELECT EXISTS (SELECT 1 FROM outbox_events WHERE key = :k AND id > :a AND type = ANY(:t))"),
            {"k": str(task_id), "a": after, "t": list(STREAM_TYPES)}))

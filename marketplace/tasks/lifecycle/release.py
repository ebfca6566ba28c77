"""Sending subtasks to the broker: the fair dispatcher's releases, and recovery's re-sends.

Neither changes a status (a sent subtask is Pending until a node claims it): they count the
sends (`subtasks.dispatches`, the message id's suffix) and take released subtasks off their
task's backlog. Which subtasks go is decided elsewhere (`scheduling.fair`).
"""
from __future__ import annotations

import uuid
from typing import Any

import marketplace.tasks.lifecycle.statements as sql


def release(conn: Any, picks: dict[str, int]) -> dict[str, list[tuple[str, int, int]]]:
    """Take `picks[task]` next subtasks of each task off its backlog, as sent once, in the caller's
    transaction (which holds the queue's release lock). Tasks another door holds now (ending) are
    left out. Returns task -> (message id to publish (`<subtask id>:1`), index, replica), in index
    order (replicas of one batch together)."""
    if not picks:
        return {}
    locked = [str(r.id) for r in conn.execute(sql.LOCK_TASKS, {"ids": list(picks)})]
    if not locked:
        return {}
    rows = sql.RELEASE.execute(conn, {"tasks": _array(locked), "counts": _array(picks[t] for t in locked)})
    out: dict[str, list[tuple[str, int, int]]] = {}
    for row in rows:
        out.setdefault(str(row.task_id), []).append((f"{row.id}:1", row.index, row.replica))
    return out


def resend(conn: Any, subtask_ids: list[str], *, count: bool = True) -> list[tuple[str, int]]:
    """Count one more send of each subtask still open (sent before, or running) of an active task,
    and (`count`) one more dispatch of its task; returns (message id, index) of each, for its new
    message."""
    if not subtask_ids:
        return []
    rows = conn.execute(sql.RESEND, {"ids": [str(uuid.UUID(s)) for s in subtask_ids], "count": int(count)}).all()
    return [(f"{r.id}:{r.dispatches}", r.index) for r in sorted(rows, key=lambda r: r.index)]


def _array(values: Any) -> str:
    """A PostgreSQL array literal of uuids or integers (the statement casts it)."""
    return "{" + ",".join(str(v) for v in values) + "}"

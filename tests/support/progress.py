"""Tasks driven through the worker's own progress calls, without a worker (no message is published)."""
from __future__ import annotations

import json
import uuid
from typing import Any

from sqlalchemy import select, update


def stored_task(user_id: str, inputs: list[Any]) -> tuple[str, list[str]]:
    """An `echo` task of one subtask per input, Scheduled on cpu.generic but never published."""
    from marketplace.infra.db import session_scope
    from marketplace.tasks.models import SubTask, Task
    from marketplace.tasks.schemas import TaskRequest
    from marketplace.tasks.service import create_task

    with session_scope() as session:  # stored, never published: no worker of the session runs it
        task, _ = create_task(session, user_id=uuid.UUID(user_id),
                              request=TaskRequest(model="echo", inputs=inputs, batch_size=1))
        session.execute(update(Task).where(Task.id == task.id).values(status="Scheduled", queue="cpu.generic"))
        return str(task.id), [str(i) for i in session.scalars(
            select(SubTask.id).where(SubTask.task_id == task.id).order_by(SubTask.index))]


def ran_uncharged(user_id: str, inputs: list[Any]) -> tuple[str, list[str]]:
    """A task whose subtasks all ran through the worker's own progress calls, with no charge recorded yet."""
    from marketplace.infra.storage import get_store
    from marketplace.results.service import part_key
    from marketplace.tasks import progress

    task_id, sub_ids = stored_task(user_id, inputs)
    for sid in sub_ids:
        early, work = progress.claim_subtask(sid, hostname="race@test", message_id=f"{sid}:1")
        assert early is None, early
        key = part_key(task_id, work["base"]["index"])
        sha = get_store().put_bytes(key, json.dumps(work["inputs"]).encode(), "application/json")
        progress.complete_subtask(sid, key=key, sha256=sha, seconds=0.01)
    return task_id, sub_ids

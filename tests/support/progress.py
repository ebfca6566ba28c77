"""Tasks driven through the lifecycle's own doors, without a worker (no message is published)."""
from __future__ import annotations

import json
import uuid
from typing import Any

from sqlalchemy import select, update


def stored_task(user_id: str, inputs: list[Any], *, model: str = "echo") -> tuple[str, list[str]]:
    """A task of one subtask per input, Scheduled on cpu.generic with every subtask sent once (as
    the fair dispatcher would have), but never published: no worker of the session runs it."""
    from marketplace.infra.db import session_scope
    from marketplace.tasks.models import SubTask, Task
    from marketplace.tasks.schemas import TaskRequest
    from marketplace.tasks.service import create_task

    with session_scope() as session:
        task, _ = create_task(session, user_id=uuid.UUID(user_id),
                              request=TaskRequest(model=model, inputs=inputs, batch_size=1))
        session.execute(update(Task).where(Task.id == task.id).values(status="Scheduled", queue="cpu.generic"))
        session.execute(update(SubTask).where(SubTask.task_id == task.id).values(dispatches=1))
        return str(task.id), [str(i) for i in session.scalars(
            select(SubTask.id).where(SubTask.task_id == task.id).order_by(SubTask.index))]


def claimed(subtask_id: str, *, node: str = "race@test") -> Any:
    """`lifecycle.claim` of a sent subtask, as its node's first message would: its Work."""
    from marketplace.tasks import lifecycle

    early, work = lifecycle.claim(subtask_id, node=node, message_id=f"{subtask_id}:1")
    assert early is None, early
    return work


def completed(task_id: str, subtask_id: str, *, node: str = "race@test", seconds: float = 0.01) -> Any:
    """Claim and complete a subtask with its inputs as outputs (echo): the completion's `Recorded`."""
    from marketplace.infra.storage import get_store
    from marketplace.results.service import part_key
    from marketplace.tasks import lifecycle

    work = claimed(subtask_id, node=node)
    key = part_key(task_id, work.index)
    sha = get_store().put_bytes(key, json.dumps(work.inputs).encode(), "application/json")
    return lifecycle.complete(work, node=node, key=key, sha256=sha, seconds=seconds)


def ran(user_id: str, inputs: list[Any]) -> tuple[str, list[str]]:
    """A task whose subtasks all ran through the lifecycle's doors (each charged with its outcome),
    not finished yet: what its last node would finalize."""
    task_id, sub_ids = stored_task(user_id, inputs)
    for sid in sub_ids:
        completed(task_id, sid)
    return task_id, sub_ids

"""Dispatched tasks whose queue has lost every node that could run them.

A `device: any` task whose queue lost its nodes moves to the other device's queue when that
one has a live node (GPU nodes preempted, CPU nodes up): its open subtasks are sent there.
Otherwise a `Scheduled` or `InProgress` task whose nodes all went away waits, with its messages
in the queue, for one to come back. Recovery (`maintenance.recover_stalled`) tells the
user why (`status_reason`: "waiting since <when>: no live worker serves <queue> ..."),
clears that once a node serves the queue again, and fails the task with the reason
once it has waited `schedule_timeout`, as a task that never found a node does: a job
ends, it does not wait forever. What its finished subtasks produced stays readable
(`result?partial=true`) and is all it is charged for.

The wait is timed from the first sweep that found the queue unserved (the time in the
reason), not from the task's last progress: a registry that was empty for a moment (Redis
flushed, nodes not yet heartbeating again) flags a task for one sweep at most, since
the next one finds the queue served and clears the flag.
"""
from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from marketplace.catalog import get_catalog
from marketplace.settings import get_settings
from marketplace.tasks.models import Task, TaskStatus

_SINCE = re.compile(r"^waiting since (\S+): ")
ACTIVE = (TaskStatus.SCHEDULED.value, TaskStatus.IN_PROGRESS.value)


def _capacity(task: Task, workers: list[dict[str, Any]]) -> dict[str, int]:
    """Queue -> live concurrency able to run `task.model`."""
    from marketplace.registry.service import live_capacity

    return live_capacity(None, model=task.model, workers=workers)


def _other_queue(task: Task, capacity: dict[str, int]) -> str | None:
    """For a `device: any` task, a queue of another device with a live node for its model. Its
    subtasks were cut for the first device; the hold covers either (the estimate is the dearer)."""
    from marketplace.scheduling.service import candidate_queues, choose_queue

    spec = get_catalog().get(task.model)
    if task.device != "any" or spec is None:
        return None
    others = [q for q in candidate_queues(spec, "any") if q != task.queue]
    return choose_queue(others, capacity)


def reason_for(task: Task) -> str:
    """Why no node runs it (with any node that consumes its queue but refuses the model)."""
    from marketplace.scheduling.service import wait_reason

    return wait_reason(task.model, task.device, get_catalog().get(task.model), [task.queue or ""])


def since(task: Task) -> datetime | None:
    """When a sweep first found the task's queue unserved; None if it is not flagged."""
    match = _SINCE.match(task.status_reason or "")
    return datetime.fromisoformat(match.group(1)) if match else None


def check(session: Session, task: Task, *, workers: list[dict[str, Any]], now: datetime) -> str | None:
    """For a stalled active task, under its row lock: None when a live node serves its queue;
    `rerouted` when, sent with `device: any`, it is moved to the other device's queue, which has
    one (its open subtasks are to be sent there); `stranded` when it is flagged (now or before);
    `failed` once it has waited `schedule_timeout` (failed in `session`, after-commit actions in
    `session.info`)."""
    settings = get_settings()
    capacity = _capacity(task, workers) if settings.worker_capacity_check else {}
    if not settings.worker_capacity_check or capacity.get(task.queue or "", 0):
        if since(task):
            task.status_reason = None
        return None
    other = _other_queue(task, capacity)
    if other is not None:  # `device: any`: the other device's nodes run it (a preempted GPU fleet)
        from marketplace.audit import service as audit

        audit.enqueue(session, actor="system", action="task.rerouted", subject=f"task:{task.id}", task_id=task.id,
                      data={"from": task.queue, "to": other, "reason": reason_for(task)})
        task.queue, task.status_reason = other, None
        return "rerouted"

    flagged = since(task)
    reason = reason_for(task)
    if flagged is None:
        task.status_reason = f"waiting since {now.isoformat()}: {reason}"
        return "stranded"
    waited = (now - flagged).total_seconds()
    if waited < settings.schedule_timeout:
        task.status_reason = f"waiting since {flagged.isoformat()}: {reason}"
        return "stranded"
    from marketplace.tasks.lifecycle import fail_task

    fail_task(session, task=task, error=f"{reason} since {flagged.isoformat()}: gave up after waiting {int(waited)}s "
                                        f"(schedule timeout {settings.schedule_timeout:g}s)")
    return "failed"


def clear_served(session: Session, *, workers: list[dict[str, Any]]) -> list[str]:
    """Flagged active tasks whose queue is served again (they move, so no sweep sees them stall):
    clear the flag. Returns their ids."""
    if not get_settings().worker_capacity_check:
        return []
    flagged = session.scalars(
        select(Task).where(Task.status.in_(ACTIVE), Task.status_reason.like("waiting since %"))
        .with_for_update(skip_locked=True).limit(500)
    ).all()
    cleared = []
    for task in flagged:
        if _capacity(task, workers).get(task.queue or "", 0):
            task.status_reason = None
            cleared.append(str(task.id))
    return cleared

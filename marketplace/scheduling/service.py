"""Scheduler: give a Created task a queue with live nodes (then the fair dispatcher sends its
subtasks), wait while none serves it, or fail it after the schedule timeout."""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from sqlalchemy import select

from marketplace.catalog import ModelSpec, get_catalog
from marketplace.infra.db import session_scope, utcnow
from marketplace.scheduling import dispatch
from marketplace.settings import get_settings
from marketplace.tasks import lifecycle
from marketplace.tasks.models import Task, TaskStatus

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    status: str  # scheduled | waiting | failed | noop
    queue: str | None = None
    reason: str | None = None
    released: int = 0


def candidate_queues(spec: ModelSpec, device: str) -> list[str]:
    """Queues the task may use, best first: `any` prefers GPU, then CPU (the catalog's rule, which
    the autoscaling gauge shares). None for a device the model does not run on: the API refuses
    it, and a stale row must not invent a queue."""
    return spec.candidate_queues(device)


def choose_queue(candidates: list[str], capacity: dict[str, int] | None) -> str | None:
    """The first candidate with live capacity; None means wait.

    With the capability check off (`capacity is None`) nothing is known about the nodes, so
    `any` falls back to the last candidate (CPU), which every deployment is expected to run,
    rather than a GPU queue that may have none.
    """
    if not candidates:
        return None
    if capacity is None:
        return candidates[-1]
    return next((q for q in candidates if capacity.get(q, 0) > 0), None)


def live_capacity_of(model: str) -> dict[str, int] | None:
    """Queue -> live concurrency able to run `model`; None with the capability check off."""
    if not get_settings().worker_capacity_check:
        return None
    from marketplace.infra.redis_client import get_redis
    from marketplace.registry.service import live_capacity

    return live_capacity(get_redis(), model=model)


def _model_of(task_id: str) -> str | None:
    with session_scope() as session:
        return session.scalar(select(Task.model).where(Task.id == uuid.UUID(task_id)))


def wait_reason(model: str, device: str, spec: ModelSpec | None, candidates: list[str]) -> str:
    if spec is None:
        return f"model {model!r} is no longer in the catalog"
    if not candidates:
        return f"model {model!r} does not run on device {device!r} (devices: {', '.join(spec.devices)})"
    return f"no live worker serves {' or '.join(candidates)} for model {model!r}" + _refused_by(model, candidates)


def _refused_by(model: str, candidates: list[str]) -> str:
    """Live nodes that consume a candidate queue but refuse the model, with their reasons: the
    operator's fix (a sandbox, a missing module) is then in the task's status. Read only on the
    waiting path."""
    if not get_settings().worker_capacity_check:
        return ""
    from marketplace.infra.redis_client import get_redis
    from marketplace.registry.service import live_workers

    refusals = [f"{w.get('hostname')} refuses it: {w['unavailable'][model]}" for w in live_workers(get_redis())
                if model in (w.get("unavailable") or {}) and set(candidates) & set(w.get("queues") or [])]
    return f" ({'; '.join(refusals)})" if refusals else ""


def schedule_task(task_id: str, *, model: str | None = None) -> Outcome:
    """Move a Created task to Scheduled on a live queue and release what its slots can start;
    wait; or fail after the timeout.

    `model`: the task's, when the message carries it (a submit's does): no read before the lock.
    """
    model = model or _model_of(task_id)
    if model is None:
        return Outcome("noop")
    # Read Redis before taking the row lock: the lock is held only for the decision.
    capacity = live_capacity_of(model)
    assigned = _assign(task_id, model, capacity)
    if assigned is None:
        decided = _decide_locked(task_id, capacity)
        if isinstance(decided, Outcome):
            return decided
        assigned = decided
    queue = assigned
    released = dispatch.release_queue(queue, wait=True, capacity=(capacity or {}).get(queue))
    return Outcome("scheduled", queue=queue, released=released)


def _assign(task_id: str, model: str, capacity: dict[str, int] | None) -> str | None:
    """The one-statement assignment (`lifecycle.assign`): the queue, or None for the locked path."""
    spec = get_catalog().get(model)
    if spec is None:
        return None
    queues = {d: choose_queue(candidate_queues(spec, d), capacity) for d in ("cpu", "gpu", "any")}
    if not any(queues.values()):
        return None
    assigned = lifecycle.assign(task_id, model=model, queues=queues)
    return assigned[0] if assigned else None


def _decide_locked(task_id: str, capacity: dict[str, int] | None) -> Outcome | str:
    """What `_assign` leaves, decided from the locked row: noop, waiting, failed (after the schedule
    timeout), or, for a message whose model does not match the row, the assignment itself."""
    settings = get_settings()
    with session_scope() as session:
        task = lifecycle.lock_task(session, task_id)
        if task is None or task.status != TaskStatus.CREATED.value:
            return Outcome("noop")
        spec = get_catalog().get(task.model)
        candidates = candidate_queues(spec, task.device) if spec else []
        queue = choose_queue(candidates, capacity)
        if queue is not None:
            lifecycle.assign_locked(session, task=task, queue=queue)
            return queue
        now = utcnow()
        waited = (now - task.created_at).total_seconds()
        reason = wait_reason(task.model, task.device, spec, candidates)
        if candidates and waited < settings.schedule_timeout:
            task.status_reason = f"waiting: {reason}"
            # Waiting is progress: recovery must not re-publish a task that is being retried.
            task.progress_at = now
            return Outcome("waiting", reason=reason)
        error = reason
        if candidates:
            error = f"{reason}: gave up after waiting {int(waited)}s (schedule timeout {settings.schedule_timeout:g}s)"
        lifecycle.fail_task(session, task=task, error=error)
        return Outcome("failed", reason=error)


def waiting_tasks(*, models: list[str], limit: int = 500) -> list[str]:
    """Ids of Created tasks for these models that have waited, oldest first (woken when a node appears).

    Only those a scheduling step has already sent waiting (they carry a `status_reason`):
    a task just submitted has its own `schedule` message on the way, and taking it here
    would schedule it twice over and from the node's trace instead of the request's.
    """
    with session_scope() as session:
        return [str(i) for i in session.scalars(
            select(Task.id).where(Task.status == TaskStatus.CREATED.value, Task.model.in_(models),
                                  Task.status_reason.is_not(None))
            .order_by(Task.created_at).limit(limit)
        )]


def reschedule(task_id: str) -> list[int]:
    """Send again what of an active task is lost (gRPC `Reschedule`): its subtasks that were sent
    and have not started, and those `Running` that nothing runs any more (`orphans.lost`: the
    node is gone or restarted, or the run outlived its time limit). Subtasks a live node runs
    are left to it (a copy would be skipped at its claim), and those not sent yet to the fair
    dispatcher. Returns the indexes of the subtasks actually sent again, ascending."""
    from marketplace.infra.redis_client import get_redis
    from marketplace.registry.service import live_workers
    from marketplace.scheduling.orphans import lost
    from marketplace.tasks.models import SubTask, SubTaskStatus

    workers = live_workers(get_redis())  # before the row is read, as scheduling does
    with session_scope() as session:
        task = session.get(Task, uuid.UUID(task_id))
        if task is None or task.status not in (TaskStatus.SCHEDULED.value, TaskStatus.IN_PROGRESS.value):
            return []
        limit = get_catalog().time_limit(task.model)
        ids = [str(i) for i in session.scalars(select(SubTask.id).where(
            SubTask.task_id == task.id,
            ((SubTask.status == SubTaskStatus.PENDING.value) & (SubTask.dispatches > 0))
            | lost(workers, now=utcnow(), time_limit=limit),
        ))]
        queue, model, trace_id = task.queue or "", task.model, task.trace_id
    return dispatch.resend(task_id, ids, queue=queue, model=model, trace_id=trace_id) if ids else []

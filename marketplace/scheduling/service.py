"""Scheduler / Dispatcher: pick a live queue, then fan the subtasks out as chords."""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from celery import chord, group, signature
from sqlalchemy import select

from marketplace.catalog import ModelSpec, get_catalog
from marketplace.events.outbox import emit, topic_for
from marketplace.infra.db import autocommit, session_scope, utcnow
from marketplace.infra.prepared import Prepared
from marketplace.scheduling.lost import hard_time_limit
from marketplace.settings import get_settings
from marketplace.tasks.models import SubTask, SubTaskStatus, Task, TaskStatus

logger = logging.getLogger(__name__)
RUN_SUBTASK = "workers.run_subtask"
FINALIZE = "marketplace.results.finalize"
LOST_RUN = "marketplace.scheduling.lost_run"
# Subtask messages per pipelined broker write. Small enough that nodes start on the first
# ones while the rest are sent: with the whole chord in one batch, nothing ran until the
# last message was built (fan-out of 1,000: slower, though cheaper). Measured at 32-128.
PUBLISH_BATCH = 64
# A broker that drops out while a job's chords go out: re-send what is not final as soon as it
# is back (seconds between tries), rather than leave the task Scheduled until recovery's stall
# deadline notices it. ~15 s in all; a longer outage is recovery's, as before.
DISPATCH_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)


# The common case in one round trip: a Created task whose device has a live queue becomes Scheduled
# on it, with its TaskAssigned event, and the statement returns what the dispatch needs (the
# locked ORM path below was five round trips). The queue is chosen per device beforehand (:cpu,
# :gpu, :any; NULL where none is live). Anything else (waiting, failing, a task that moved on)
# finds no row here and takes the locked path, which decides from the row.
_ASSIGN = Prepared("mp_assign_queue", """
    WITH t AS (
        UPDATE tasks SET queue = CASE device WHEN 'cpu' THEN :cpu WHEN 'gpu' THEN :gpu ELSE :any END,
               status = 'Scheduled', scheduled_at = :now, progress_at = :now, status_reason = NULL,
               dispatch_count = dispatch_count + 1
        WHERE id = :id AND status = 'Created' AND model = :model
          AND CASE device WHEN 'cpu' THEN :cpu WHEN 'gpu' THEN :gpu ELSE :any END IS NOT NULL
        RETURNING user_id, queue, priority, dispatch_count, trace_id
    ), s AS (
        SELECT COALESCE(array_agg(id ORDER BY index), '{}') AS ids FROM subtasks WHERE task_id = :id
    ), o AS (
        INSERT INTO outbox_events (topic, key, type, payload, created_at)
        SELECT :topic, :key, 'TaskAssigned',
               jsonb_build_object('task_id', :key, 'user_id', t.user_id::text, 'queue', t.queue,
                                  'subtasks', cardinality(s.ids), 'priority', t.priority,
                                  'dispatch_count', t.dispatch_count),
               :now
        FROM t, s
        RETURNING id
    )
    SELECT t.queue, t.priority, t.dispatch_count, t.trace_id, s.ids FROM t, s
""", types={"id": "uuid", "model": "text", "cpu": "text", "gpu": "text", "any": "text", "now": "timestamptz",
            "topic": "text", "key": "text"})


@dataclass
class Outcome:
    status: str  # scheduled | waiting | failed | noop
    queue: str | None = None
    reason: str | None = None
    subtask_ids: list[str] = field(default_factory=list)


def candidate_queues(spec: ModelSpec, device: str) -> list[str]:
    """Queues the task may use, best first: `any` prefers GPU, then CPU."""
    if device == "any":
        devices = [d for d in ("gpu", "cpu") if d in spec.devices]
    elif device in spec.devices:
        devices = [device]
    else:
        devices = []  # the API refuses this; a stale row must not invent a queue
    return [spec.queue(d) for d in devices]  # type: ignore[arg-type]


def choose_queue(candidates: list[str], capacity: dict[str, int] | None) -> str | None:
    """The first candidate with live capacity; None means wait.

    With the capability check off (`capacity is None`) nothing is known about
    the nodes, so `any` falls back to the last candidate (CPU), which every
    deployment is expected to run, rather than a GPU queue that may have none.
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
    """Move a Created task to Scheduled on a live queue, wait, or fail after the timeout.

    `model`: the task's, when the message carries it (a submit's does): no read before the lock.
    """
    model = model or _model_of(task_id)
    if model is None:
        return Outcome("noop")
    # Read Redis before taking the row lock: the lock is held only for the decision.
    capacity = live_capacity_of(model)
    assigned = _assign(task_id, model, capacity) or _decide_locked(task_id, capacity)
    if isinstance(assigned, Outcome):
        return assigned
    queue, priority, attempt, trace_id, ids = assigned
    dispatch_until_sent(task_id, ids, queue=queue, priority=priority, time_limit=get_catalog().time_limit(model),
                        attempt=attempt, trace_id=trace_id)
    return Outcome("scheduled", queue=queue, subtask_ids=ids)


_Assignment = tuple[str, int, int, str | None, list[str]]  # queue, priority, dispatch count, trace id, subtask ids


def _decide_locked(task_id: str, capacity: dict[str, int] | None) -> Outcome | _Assignment:
    """What `_assign` leaves, decided from the locked row: noop, waiting, failed (after the schedule
    timeout), or, for a message whose model does not match the row, the assignment itself."""
    settings = get_settings()
    failed: Outcome | None = None
    actions: list[tuple[str, str]] = []
    with session_scope() as session:
        task = session.scalar(select(Task).where(Task.id == uuid.UUID(task_id)).with_for_update())
        if task is None or task.status != TaskStatus.CREATED.value:
            return Outcome("noop")
        spec = get_catalog().get(task.model)
        candidates = candidate_queues(spec, task.device) if spec else []
        queue = choose_queue(candidates, capacity)
        now = utcnow()
        if queue is None:
            waited = (now - task.created_at).total_seconds()
            reason = wait_reason(task.model, task.device, spec, candidates)
            if candidates and waited < settings.schedule_timeout:
                task.status_reason = f"waiting: {reason}"
                # Waiting is progress: recovery must not re-publish a task that is being retried.
                task.progress_at = now
                return Outcome("waiting", reason=reason)
            from marketplace.results.service import fail_task

            error = reason
            if candidates:
                error = (f"{reason}: gave up after waiting {int(waited)}s "
                         f"(schedule timeout {settings.schedule_timeout:g}s)")
            task.status_reason = None
            fail_task(session, task=task, error=error)
            actions = session.info.pop("after_commit", [])
            failed = Outcome("failed", reason=error)
        else:
            task.queue = queue
            task.status = TaskStatus.SCHEDULED.value
            task.scheduled_at = now
            task.progress_at = now
            task.status_reason = None
            task.dispatch_count += 1
            ids = [str(i) for i in session.scalars(
                select(SubTask.id).where(SubTask.task_id == task.id).order_by(SubTask.index)
            )]
            emit_assigned(session, task, subtasks=len(ids))
            assignment = (queue, task.priority, task.dispatch_count, task.trace_id, ids)
    if failed is not None:
        from marketplace.results.service import run_after_commit

        run_after_commit(actions)
        return failed
    return assignment


def emit_assigned(session: Any, task: Task, *, subtasks: int) -> None:
    """The `TaskAssigned` event of a task given its queue (scheduled, or moved by recovery).
    `_ASSIGN` writes the same payload in SQL."""
    emit(session, type="TaskAssigned", key=str(task.id), payload={
        "task_id": str(task.id), "user_id": str(task.user_id), "queue": task.queue, "subtasks": subtasks,
        "priority": task.priority, "dispatch_count": task.dispatch_count})


def _assign(task_id: str, model: str, capacity: dict[str, int] | None) -> _Assignment | None:
    """`_ASSIGN`: (queue, priority, dispatch count, trace id, subtask ids), or None for the locked path."""
    spec = get_catalog().get(model)
    if spec is None:
        return None
    queues = {d: choose_queue(candidate_queues(spec, d), capacity) for d in ("cpu", "gpu", "any")}
    if not any(queues.values()):
        return None
    with autocommit() as conn:  # one statement: it commits by itself
        row = _ASSIGN.execute(conn, {"id": uuid.UUID(task_id), "model": model, **queues, "now": utcnow(),
                                     "topic": topic_for("TaskAssigned"), "key": task_id}).first()
    if row is None:
        return None
    return row.queue, row.priority, row.dispatch_count, row.trace_id, [str(i) for i in row.ids]


def dispatch_until_sent(task_id: str, subtask_ids: list[str], **kwargs: Any) -> None:
    """`dispatch`; a broker that drops out meanwhile gets the task's open subtasks sent again
    once it answers (`_redispatch_when_back`), not after recovery's stall deadline."""
    try:
        dispatch(task_id, subtask_ids, **kwargs)
    except _broker_errors() as exc:
        _redispatch_when_back(task_id, exc)


def _broker_errors() -> tuple[type[BaseException], ...]:
    """What a publish raises when the broker is unreachable: kombu's wrapper and the transport's own."""
    from kombu.exceptions import OperationalError

    from marketplace.infra.celery_app import app

    with app.connection_for_write() as conn:  # not connected: only asks the transport
        return (OperationalError, *conn.connection_errors)


def _redispatch_when_back(task_id: str, error: BaseException) -> None:
    """The dispatch failed part-way: once the broker answers, send every subtask that is not final
    again, as a new dispatch (new message ids: a copy that did go out and runs is not run twice)."""
    errors = _broker_errors()
    for delay in DISPATCH_RETRY_DELAYS:
        logger.warning("dispatch of task %s failed (%s); sending it again in %gs", task_id, error, delay)
        time.sleep(delay)
        try:
            redispatch_missing(task_id)
            logger.info("dispatch of task %s: sent again after a broker error", task_id)
            return
        except errors as exc:
            error = exc
    logger.error("dispatch of task %s failed: %s; recovery sends it after its stall deadline", task_id, error)


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


def callback_id(task_id: str, attempt: int, chunk: int) -> str:
    """Deterministic chord-callback ids: operators and tests can look a callback up."""
    return f"{task_id}:finalize:{attempt}:{chunk}"


def last_subtask_finalize_id(task_id: str) -> str:
    """The id of the finalize a big task's last subtask sends (`workers.runner`)."""
    return f"{task_id}:finalize:last"


def celery_subtask_id(subtask_id: str, attempt: int) -> str:
    """The broker message id of a subtask's `attempt`-th dispatch (cancel revokes these)."""
    return f"{subtask_id}:{attempt}"


def dispatch(
    task_id: str, subtask_ids: list[str], *, queue: str, priority: int, time_limit: float, attempt: int = 1,
    trace_id: str | None = None,
) -> None:
    """Publish chords of at most `max_subtasks_per_chord` subtasks, each ending in finalize.

    Every chord's callback calls finalize; it finishes the task only once all
    subtasks in the database are final, so splitting big jobs is safe. With the
    task's `trace_id`, the messages join the job's trace whoever publishes them.
    """
    from marketplace.audit.signals import dispatching
    from marketplace.observability.tracing import job_trace

    with job_trace(trace_id, "dispatch"), dispatching(task_id):
        _publish(task_id, subtask_ids, queue=queue, priority=priority, time_limit=time_limit, attempt=attempt)


def _publish(task_id: str, subtask_ids: list[str], *, queue: str, priority: int, time_limit: float,
             attempt: int) -> None:
    from marketplace.infra.celery_app import batched_publishing

    # One pipelined write per PUBLISH_BATCH messages instead of a round trip each (fan-out of
    # 1,000: 4-9% less CPU per subtask, interleaved A/B). A broker error fails the dispatch as an
    # unbatched publish could, part-way; recovery re-sends what is missing after the deadline.
    with batched_publishing(PUBLISH_BATCH):
        _publish_chords(task_id, subtask_ids, queue=queue, priority=priority, time_limit=time_limit,
                        attempt=attempt)


def _finalize(task_id: str, **options: Any) -> Any:
    from marketplace.infra.celery_app import app

    return signature(FINALIZE, args=[task_id], queue="marketplace.results", immutable=True, app=app, **options)


def _publish_chords(task_id: str, subtask_ids: list[str], *, queue: str, priority: int, time_limit: float,
                    attempt: int) -> None:
    # Every signature names the app: unbound ones take the thread's current app, which in any thread
    # but the one that made ours (gRPC's, e.g. Reschedule) is Celery's fallback app, configured on
    # its own, and not the producer that `batched_publishing` holds.
    from marketplace.infra.celery_app import app

    if not subtask_ids:
        _finalize(task_id).apply_async(task_id=callback_id(task_id, attempt, 0))
        return
    size = get_settings().max_subtasks_per_chord
    broker_priority = 9 - priority  # Redis serves lower numbers first
    hard = hard_time_limit(time_limit)
    # A run killed at its hard limit fails its message (see scheduling/lost.py): `lost` retries
    # or fails the subtask (a second later, once the pool has killed the process), and the
    # chord it broke still calls finalize.
    lost = signature(LOST_RUN, queue="marketplace.scheduler", countdown=1.0, app=app)
    finish_anyway = _finalize(task_id)
    for chunk, start in enumerate(range(0, len(subtask_ids), size)):
        # ignore_result: nothing reads a subtask's Celery result (the row is the truth and finalize
        # is immutable), and Celery still counts it into the chord without it. Storing it cost a
        # Redis write per subtask kept for `result_expires` (measured: 8% of a fan-out's CPU).
        header = group(
            (signature(RUN_SUBTASK, args=[sid], queue=queue, priority=broker_priority, ignore_result=True,
                       soft_time_limit=time_limit, time_limit=hard, link_error=[lost], app=app)
             .set(task_id=celery_subtask_id(sid, attempt))
             for sid in subtask_ids[start : start + size]),
            app=app,
        )
        callback = _finalize(task_id, link_error=[finish_anyway]).set(task_id=callback_id(task_id, attempt, chunk))
        chord(header, callback, app=app).apply_async()


def redispatch_missing(task_id: str) -> list[str]:
    """Re-publish the subtasks that are not final and not running (gRPC `Reschedule`, a dispatch
    the broker cut short); returns their ids, which is what was sent.

    `Pending` ones, and `Running` ones that nothing runs any more (`orphans.lost`: the node is gone
    or restarted, or the run outlived its time limit). A subtask a live node runs is left to it:
    its copy would be skipped at its claim, so it is not sent, nor reported as sent. With none
    open the callback runs again (all final, the task not yet)."""
    from marketplace.infra.redis_client import get_redis
    from marketplace.registry.service import live_workers
    from marketplace.scheduling.orphans import lost

    workers = live_workers(get_redis())  # before the row lock, as scheduling does
    with session_scope() as session:
        task = session.get(Task, uuid.UUID(task_id))
        if task is None or task.status not in (TaskStatus.SCHEDULED.value, TaskStatus.IN_PROGRESS.value):
            return []
        limit = get_catalog().time_limit(task.model)
        now = utcnow()
        open_ = session.execute(
            select(SubTask.id, (SubTask.status == SubTaskStatus.PENDING.value)
                   | lost(workers, now=now, time_limit=limit)).where(
                SubTask.task_id == task.id,
                SubTask.status.in_((SubTaskStatus.PENDING.value, SubTaskStatus.RUNNING.value)),
            ).order_by(SubTask.index)
        ).all()
        ids = [str(sid) for sid, resend in open_ if resend]
        if open_ and not ids:
            return []  # every open subtask runs on a live node
        task.progress_at = now
        task.dispatch_count += 1
        queue, priority, attempt, trace_id = task.queue, task.priority, task.dispatch_count, task.trace_id
    if queue:
        dispatch(task_id, ids, queue=queue, priority=priority, time_limit=limit, attempt=attempt,
                 trace_id=trace_id)
    return ids

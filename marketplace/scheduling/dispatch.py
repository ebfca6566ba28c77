"""The fair dispatcher: releases a queue's waiting subtasks to the broker as its slots free up.

A queue's subtasks wait in PostgreSQL (their tasks' backlogs); `release_queue` sends what the
queue's live slots can start soon (free slots, plus a window of ~`fair.WINDOW_SECONDS` of work
per slot so that no node idles between two subtasks), in the order `fair.plan` decides, as a
group of `workers.run_subtask` messages. It runs when a task is assigned, when a node records
an outcome and finds the queue's broker list short (`release_if_low`), when a node comes
online, and every few seconds from beat (`marketplace.scheduling.release`), which also covers
a release lost on the way. The broker so never holds a job's whole backlog: a newcomer's job
goes next instead of behind it, and a cancel has little to revoke.

The last subtask of a task to finish finishes the task (`workers.runner`: inline for a small
task, by a `marketplace.results.finalize` message for a big one), so no chord callback is
needed to join the parts.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from celery import group, signature
from sqlalchemy import text

from marketplace.catalog import get_catalog
from marketplace.infra import names
from marketplace.infra.db import get_engine, utcnow
from marketplace.scheduling import fair, replicas
from marketplace.settings import get_settings
from marketplace.tasks import lifecycle

logger = logging.getLogger(__name__)
# Subtask messages per pipelined broker write (see `infra.celery_app.batched_publishing`).
PUBLISH_BATCH = 64
# Tasks read per user at each release: enough for any room, not a user's thousand jobs.
TASKS_PER_USER = 64
WINDOW_KEY = "marketplace:release:window:{}"
# A node reads a queue's remembered window at most this often (seconds): it changes only with a
# release, and `release_if_low` runs after every outcome. Two Redis round trips per subtask (the
# window, then the broker lists) were ~15% of a pool process's time in a fan-out of one-item jobs.
WINDOW_CACHE_S = 1.0
_windows: dict[str, tuple[float, int | None]] = {}  # queue -> (read at, window), per process
# Set (in the broker's Redis) while a release of the queue runs, its publish included. A node's
# trigger reads it with the broker lists and leaves the work to that release: in a fan-out of
# 1,000 one-item subtasks ~40 outcomes a job each found the list short while another process was
# releasing, and paid the registry read, a broker read and a transaction to find the lock taken.
BUSY_KEY = "marketplace:release:busy:{}"
BUSY_TTL_MS = 2000  # a release that died holding it delays the next by at most this
# A release whose publish failed (the broker dropped out): its subtasks are sent again, as new
# messages, once the broker answers (seconds between tries); a longer outage is recovery's.
RESEND_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)
# How long past its soft limit a subtask that ignores it is killed (less for limits under this).
HARD_LIMIT_GRACE = 30.0


def hard_time_limit(soft: float) -> float:
    return soft + min(HARD_LIMIT_GRACE, soft)


_LOCK = text("SELECT pg_advisory_xact_lock(hashtext('mp-release:' || :queue))")
_TRY_LOCK = text("SELECT pg_try_advisory_xact_lock(hashtext('mp-release:' || :queue))")
_QUEUES_WITH_BACKLOG = text("""
    SELECT DISTINCT queue FROM tasks WHERE backlog > 0 AND status IN ('Scheduled', 'InProgress')
""")


def capacity_of(queue: str) -> int:
    """Slots of the live nodes consuming `queue` (each node's pool size)."""
    from marketplace.infra.redis_client import get_redis
    from marketplace.registry.service import live_capacity

    if not get_settings().worker_capacity_check:
        return 1
    return int(live_capacity(get_redis()).get(queue, 0))


def release_queue(queue: str, *, wait: bool = True, capacity: int | None = None) -> int:
    """Send `queue` what its slots can start soon, in fair order; returns how many were sent.

    `wait`: wait for a release running elsewhere to end (a task was just assigned: it must be
    seen); otherwise that one is left to do the work (a node's trigger)."""
    busy = _mark_busy(queue, only_if_free=not wait)
    if busy is False:
        return 0  # another release of the queue is running (a node's trigger, the beat)
    try:
        return _release(queue, wait=wait, capacity=capacity)
    finally:
        if busy:
            _clear_busy(queue)


def _release(queue: str, *, wait: bool, capacity: int | None) -> int:
    capacity = capacity_of(queue) if capacity is None else capacity
    if capacity <= 0:
        return 0  # no live node: its tasks wait, saying so (scheduling.stranded)
    settings = get_settings()
    waiting = _broker_depth(queue, direct=replicas.direct_lists(queue))
    with get_engine().begin() as conn:
        locked = conn.execute(_LOCK if wait else _TRY_LOCK, {"queue": queue}).scalar()
        if not wait and not locked:
            return 0
        users = fair.queue_state(conn, queue, per_user=TASKS_PER_USER,
                                 default_cap=settings.default_max_running_subtasks)
        if not any(u.tasks for u in users):
            return 0
        seconds = fair.expected_seconds(users)
        window = fair.window(capacity, seconds)
        # What waits in the broker is read there, not counted from the rows: a message the broker
        # lost (flushed, a node that died holding it) must not take a slot until recovery re-sends it.
        room = capacity - sum(u.running for u in users) + window - waiting
        _remember_window(queue, window)
        if room <= 0:
            return 0
        meta = {t.task_id: (t.model, t.trace_id) for u in users for t in u.tasks}
        planned = fair.plan(room, users, default=seconds)
        sent = lifecycle.release(conn, planned.picks)
        fair.keep(conn, queue, users, planned.lifted, now=utcnow())
    _publish_all(queue, sent, meta)
    return sum(len(ids) for ids in sent.values())


def _mark_busy(queue: str, *, only_if_free: bool) -> bool | None:
    """Mark a release of `queue` as running: True when marked, False when `only_if_free` and one
    runs already, None when the broker cannot say (not Redis, unreachable: the lock decides)."""
    from marketplace.infra.broker import broker_redis

    try:
        client = broker_redis()
        if client is None:
            return None
        return bool(client.set(BUSY_KEY.format(queue), "1", px=BUSY_TTL_MS, nx=only_if_free))
    except Exception:
        logger.debug("could not mark the release of %s", queue, exc_info=True)
        return None


def _clear_busy(queue: str) -> None:
    from marketplace.infra.broker import broker_redis

    try:
        client = broker_redis()
        if client is not None:
            client.delete(BUSY_KEY.format(queue))
    except Exception:  # it expires by itself
        logger.debug("could not clear the release mark of %s", queue, exc_info=True)


def _broker_depth(queue: str, *, direct: list[str] | None = None) -> int:
    """Messages waiting in the queue's lists, and in the per-node lists of its nodes (`direct`:
    the replicas of verified tasks go there, `scheduling.replicas`)."""
    from marketplace.infra.broker import queue_depths

    depths = queue_depths([queue, *(direct or [])])
    return int(sum(depths.values()))


def release_if_low(queue: str) -> int:
    """A node's trigger after an outcome: release when the queue's broker list holds half its
    window or less (one Redis round trip when it does not)."""
    from marketplace.infra.broker import queue_depth_and_flag
    from marketplace.infra.redis_client import get_redis

    if not queue:
        return 0
    try:
        now = time.monotonic()
        read_at, remembered = _windows.get(queue, (-WINDOW_CACHE_S, None))
        if now - read_at >= WINDOW_CACHE_S:
            raw = get_redis().get(WINDOW_KEY.format(queue))
            remembered = None if raw is None else int(raw)
            _windows[queue] = (now, remembered)
        depth, busy = queue_depth_and_flag(queue, BUSY_KEY.format(queue), also=replicas.direct_lists(queue))
    except Exception:  # the beat's periodic release covers it
        logger.warning("release trigger for %s: could not read the broker", queue, exc_info=True)
        return 0
    if busy or (remembered is not None and depth > remembered // 2):
        return 0
    return release_queue(queue, wait=False)


def release_all() -> dict[str, int]:
    """Every queue with a backlog (beat): what each released."""
    with get_engine().connect() as conn:
        queues = [q for (q,) in conn.execute(_QUEUES_WITH_BACKLOG) if q]
    return {q: release_queue(q, wait=False) for q in queues}


def _remember_window(queue: str, window: int) -> None:
    from marketplace.infra.redis_client import get_redis

    _windows[queue] = (time.monotonic(), window)  # this process knows it now
    try:
        get_redis().set(WINDOW_KEY.format(queue), window, ex=3600)
    except Exception:  # nodes then trigger a release at every outcome: slower, not wrong
        logger.debug("could not remember the window of %s", queue, exc_info=True)


def _publish_all(queue: str, sent: dict[str, list[tuple[str, int, int]]],
                 meta: dict[str, tuple[str, str | None]]) -> None:
    """Publish a release: to the queue, and a verified task's replicas each to a distinct node."""
    placed = replicas.place(queue, sent)
    for (task_id, target), message_ids in placed.items():
        model, trace_id = meta.get(task_id, ("", None))
        try:
            publish(task_id, message_ids, queue=target, time_limit=get_catalog().time_limit(model),
                    trace_id=trace_id)
        except _broker_errors() as exc:
            _resend_when_back(task_id, exc)


def publish(task_id: str, message_ids: list[str], *, queue: Any, time_limit: float,
            trace_id: str | None = None) -> None:
    """One group of `workers.run_subtask` messages (`<subtask id>:<dispatch>` each) on `queue`.

    With the task's `trace_id`, the messages join the job's trace whoever publishes them."""
    from marketplace.audit.signals import dispatching
    from marketplace.infra.celery_app import app, batched_publishing
    from marketplace.observability.tracing import job_trace

    hard = hard_time_limit(time_limit)
    # Every signature names the app: an unbound one takes the thread's current app, which in any
    # thread but the one that made ours (gRPC's, e.g. Reschedule) is Celery's fallback app,
    # configured on its own, and not the producer that `batched_publishing` holds.
    # A run killed at its hard limit fails its message (scheduling/lost.py): `lost_run` retries or
    # fails the subtask a second later, once the pool has killed the process.
    lost = signature(names.LOST_RUN, queue=names.SCHEDULER_QUEUE, countdown=1.0, app=app)
    # ignore_result: nothing reads a subtask's Celery result (the row is the truth).
    messages = group(
        (signature(names.RUN_SUBTASK, args=[mid.rpartition(":")[0]], queue=queue, ignore_result=True,
                   soft_time_limit=time_limit, time_limit=hard, link_error=[lost], app=app).set(task_id=mid)
         for mid in message_ids),
        app=app,
    )
    with job_trace(trace_id, "dispatch"), dispatching(task_id), batched_publishing(PUBLISH_BATCH):
        messages.apply_async()


def resend(task_id: str, subtask_ids: list[str], *, queue: str, model: str, trace_id: str | None,
           count: bool = True) -> list[int]:
    """Send these open subtasks again, as new messages (recovery, a lost run); their indexes.
    `count`: the task counts one more dispatch (recovery's re-route counted it already)."""
    with get_engine().begin() as conn:
        sent = lifecycle.resend(conn, subtask_ids, count=count)
    if sent:
        publish(task_id, [mid for mid, _ in sent], queue=queue, time_limit=get_catalog().time_limit(model),
                trace_id=trace_id)
    return [index for _, index in sent]


def redirect(subtask_id: str, *, refused_by: str) -> str | None:
    """Send a subtask that `refused_by` may not run (verified results) straight to a node that may
    (`replicas.redirect_target`), as a new message; that node, or None where none is live."""
    from celery.utils.nodenames import worker_direct

    found = replicas.redirect_target(subtask_id, refused_by=refused_by)
    if found is None:
        return None
    facts, target = found
    with get_engine().begin() as conn:
        sent = lifecycle.resend(conn, [subtask_id], count=False)
    if not sent:
        return None
    publish(str(facts.task_id), [mid for mid, _ in sent], queue=worker_direct(target),
            time_limit=get_catalog().time_limit(facts.model), trace_id=facts.trace_id)
    return target


def _broker_errors() -> tuple[type[BaseException], ...]:
    """What a publish raises when the broker is unreachable: kombu's wrapper and the transport's own."""
    from kombu.exceptions import OperationalError

    from marketplace.infra.celery_app import app

    with app.connection_for_write() as conn:  # not connected: only asks the transport
        return (OperationalError, *conn.connection_errors)


def _resend_when_back(task_id: str, error: BaseException) -> None:
    """A release's publish failed part-way: once the broker answers, send the task's sent-but-not
    started subtasks again as new messages (a copy that did go out and runs is not run twice)."""
    errors = _broker_errors()
    for delay in RESEND_DELAYS:
        logger.warning("publish for task %s failed (%s); sending again in %gs", task_id, error, delay)
        time.sleep(delay)
        try:
            resend_open(task_id)
            return
        except errors as exc:
            error = exc
    logger.error("publish for task %s failed: %s; recovery sends it after its stall deadline", task_id, error)


_OPEN_SENT = text("""
    SELECT t.queue, t.model, t.trace_id,
           COALESCE(array_agg(s.id::text ORDER BY s.index) FILTER (WHERE s.id IS NOT NULL), '{}') AS ids
    FROM tasks t LEFT JOIN subtasks s ON s.task_id = t.id AND s.status = 'Pending' AND s.dispatches > 0
    WHERE t.id = :id AND t.status IN ('Scheduled', 'InProgress')
    GROUP BY t.queue, t.model, t.trace_id
""")


def resend_open(task_id: str) -> list[int]:
    """Send again, as new messages, the task's subtasks that were sent and have not started."""
    with get_engine().connect() as conn:
        row = conn.execute(_OPEN_SENT, {"id": task_id}).first()
    if row is None or not row.ids or not row.queue:
        return []
    return resend(task_id, list(row.ids), queue=row.queue, model=row.model, trace_id=row.trace_id)

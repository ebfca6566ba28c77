"""Which subtasks a queue's nodes run next: the one place that decides it.

Pending work waits in PostgreSQL (each task's backlog); the dispatcher (`scheduling.dispatch`)
releases to a queue only what its live slots can start soon, and asks `plan` which subtasks.

Why this order: start-time fair queueing over slot-seconds, weighted by each user's `share`.
Every user with work for the queue has a virtual time: the slot-seconds its subtasks used there
(`fair_shares.used`, counted at each completion) plus those it has in flight now (running or
sent, each expected to take the user's mean there), divided by its share. The next subtask goes
to the user with the smallest virtual time, whose time then grows by one expected subtask over
its share. So over any stretch where several users keep work waiting, each gets slot-seconds in
proportion to its share (3:1 shares, 75% and 25%), whatever its jobs' sizes; a user alone gets
every slot; and a newcomer's small job goes next, not behind a big job's thousands of subtasks.
Idling banks no credit: a user that arrives (new on the queue, or back after its work there
ran out) starts level with the least served of those already there (its `used` is raised to
theirs, once), not at what it had when it left. A user that waits, starved, keeps what it is owed.

Within a user's share, its tasks go by `priority` (9 first), then age. A user's
`max_running_subtasks` caps what it has in flight (running or sent). Each release reads the
queue's backlogged tasks (a few per user), its in-flight counts per user and their
`fair_shares` rows: its cost follows the users and what it releases, not what is queued.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import text

from marketplace.tasks.lifecycle.moves import sql_in
from marketplace.tasks.models import SubTaskStatus, TaskStatus

# What a subtask is expected to take when its user has none finished on the queue yet.
DEFAULT_SECONDS = 1.0
# The broker holds about this many seconds of work per slot beyond the free slots: enough that
# no node idles between two subtasks, short enough that a newcomer's job is not behind much.
WINDOW_SECONDS = 0.25
MAX_WINDOW = 500  # messages, whatever the subtasks' sizes


@dataclass
class TaskBacklog:
    task_id: str
    priority: int
    created_at: datetime
    backlog: int
    model: str = ""
    trace_id: str | None = None
    scheduled_at: datetime | None = None  # when it joined the queue (its assignment)


@dataclass
class UserState:
    user_id: str
    share: float = 1.0
    cap: int | None = None  # max_running_subtasks
    running: int = 0
    waiting: int = 0  # sent to the broker, not started
    used: float = 0.0
    avg_seconds: float | None = None
    tasks: list[TaskBacklog] = field(default_factory=list)
    stored: bool = False  # it has its `fair_shares` row
    touched_at: datetime | None = None  # that row's last change (a completion, a release's lift)

    @property
    def in_flight(self) -> int:
        return self.running + self.waiting

    def expected(self, default: float) -> float:
        return self.avg_seconds if self.avg_seconds else default

    def vtime(self, default: float) -> float:
        return (self.used + self.in_flight * self.expected(default)) / max(self.share, 1e-9)

    def arriving(self) -> bool:
        """New on the queue, or back: nothing of it in flight, and nothing happened to its row
        since its oldest waiting task joined the queue (a user that waits, starved, was seen since)."""
        if self.in_flight or not self.tasks:
            return False
        if not self.stored or self.touched_at is None:
            return True
        joined = min((t.scheduled_at or t.created_at for t in self.tasks), default=None)
        return joined is not None and self.touched_at < joined


@dataclass
class Plan:
    picks: dict[str, int]  # task -> subtasks to release
    lifted: dict[str, float]  # user -> its `used` raised (idling banks no credit)
    order: list[str]  # users, one entry per subtask released, in release order


def expected_seconds(users: list[UserState]) -> float:
    """What a subtask of this queue takes, for its window: the mean of its users' means."""
    known = [u.avg_seconds for u in users if u.avg_seconds]
    return sum(known) / len(known) if known else DEFAULT_SECONDS


def window(capacity: int, seconds: float) -> int:
    """Messages the broker may hold waiting for the queue's slots: ~WINDOW_SECONDS of work per slot."""
    return max(1, min(MAX_WINDOW, math.ceil(capacity * WINDOW_SECONDS / max(seconds, 1e-6))))


def plan(room: int, users: list[UserState], *, default: float | None = None) -> Plan:
    """Release up to `room` subtasks among `users` (those with a backlog here and those with work
    in flight), in fair order: see the module's docstring."""
    default = default or expected_seconds(users)
    lifted: dict[str, float] = {}
    arriving = {u.user_id for u in users if u.arriving()}
    # The service the users already here have had (what ran, not what is expected of their work in
    # flight): an arriving user starts level with the least of them.
    present = [u.used / max(u.share, 1e-9) for u in users if u.user_id not in arriving and (u.in_flight or u.tasks)]
    floor = min(present) if present else max((u.used / max(u.share, 1e-9) for u in users if u.tasks), default=0.0)
    heap: list[tuple[float, int, datetime, str]] = []
    by_id = {u.user_id: u for u in users}
    for u in users:
        if not u.tasks:
            continue
        u.tasks.sort(key=lambda t: (-t.priority, t.created_at, t.task_id))
        if u.user_id in arriving and (u.used / max(u.share, 1e-9) < floor or not u.stored):
            u.used = max(u.used, floor * u.share)
            lifted[u.user_id] = u.used
        heapq.heappush(heap, (u.vtime(default), u.in_flight, u.tasks[0].created_at, u.user_id))
    picks: dict[str, int] = {}
    order: list[str] = []
    while room > 0 and heap:
        _, _, _, uid = heapq.heappop(heap)
        u = by_id[uid]
        if u.cap is not None and u.in_flight >= u.cap:
            continue  # at its cap: it waits for one of its own to finish
        task = u.tasks[0]
        picks[task.task_id] = picks.get(task.task_id, 0) + 1
        task.backlog -= 1
        if task.backlog <= 0:
            u.tasks.pop(0)
        u.waiting += 1
        order.append(uid)
        room -= 1
        if u.tasks:
            heapq.heappush(heap, (u.vtime(default), u.in_flight, u.tasks[0].created_at, uid))
    return Plan(picks=picks, lifted=lifted, order=order)


# -- what a release reads (in its transaction, under the queue's release lock) -----------------------
_ACTIVE = sql_in((TaskStatus.SCHEDULED.value, TaskStatus.IN_PROGRESS.value))
# The queue's backlogged tasks, the first few of each user in its own order (a user's thousand
# small jobs are not read at every release).
_BACKLOG = text(f"""
    SELECT id, user_id, priority, created_at, scheduled_at, backlog, model, trace_id, share,
           max_running_subtasks FROM (
        SELECT t.id, t.user_id, t.priority, t.created_at, t.scheduled_at, t.backlog, t.model, t.trace_id,
               u.share, u.max_running_subtasks,
               row_number() OVER (PARTITION BY t.user_id ORDER BY t.priority DESC, t.created_at, t.id) AS rank
        FROM tasks t JOIN users u ON u.id = t.user_id
        WHERE t.queue = :queue AND t.backlog > 0 AND t.status IN {_ACTIVE}
    ) ranked WHERE rank <= :per_user
""")
_IN_FLIGHT = text(f"""
    SELECT t.user_id, u.share, u.max_running_subtasks,
           count(*) FILTER (WHERE s.status = '{SubTaskStatus.RUNNING.value}') AS running,
           count(*) FILTER (WHERE s.status = '{SubTaskStatus.PENDING.value}') AS waiting
    FROM tasks t JOIN subtasks s ON s.task_id = t.id JOIN users u ON u.id = t.user_id
    WHERE t.queue = :queue AND t.status IN {_ACTIVE}
      AND (s.status = '{SubTaskStatus.RUNNING.value}'
           OR (s.status = '{SubTaskStatus.PENDING.value}' AND s.dispatches > 0))
    GROUP BY t.user_id, u.share, u.max_running_subtasks
""")
_SHARES = text("""
    SELECT user_id, used, avg_seconds, updated_at FROM fair_shares
    WHERE queue = :queue AND user_id = ANY(CAST(:users AS uuid[]))
""")
_KEEP = text("""
    INSERT INTO fair_shares (queue, user_id, used, done, updated_at)
    SELECT :queue, u.user_id, u.used, 0, :now
    FROM unnest(CAST(:users AS uuid[]), CAST(:used AS float8[])) AS u(user_id, used)
    ON CONFLICT (queue, user_id) DO UPDATE SET used = GREATEST(fair_shares.used, EXCLUDED.used),
                                               updated_at = EXCLUDED.updated_at
""")


def queue_state(conn: Any, queue: str, *, per_user: int, default_cap: int | None) -> list[UserState]:
    """The users of `queue` with a backlog or work in flight, with their tasks' backlogs."""
    users: dict[str, UserState] = {}

    def user(uid: Any, share: Any, cap: Any) -> UserState:
        key = str(uid)
        if key not in users:
            users[key] = UserState(user_id=key, share=float(share or 1.0),
                                   cap=cap if cap is not None else default_cap)
        return users[key]

    for r in conn.execute(_BACKLOG, {"queue": queue, "per_user": per_user}):
        user(r.user_id, r.share, r.max_running_subtasks).tasks.append(
            TaskBacklog(task_id=str(r.id), priority=r.priority, created_at=r.created_at, backlog=r.backlog,
                        model=r.model, trace_id=r.trace_id, scheduled_at=r.scheduled_at))
    for r in conn.execute(_IN_FLIGHT, {"queue": queue}):
        u = user(r.user_id, r.share, r.max_running_subtasks)
        u.running, u.waiting = int(r.running), int(r.waiting)
    if users:
        for r in conn.execute(_SHARES, {"queue": queue, "users": list(users)}):
            u = users[str(r.user_id)]
            u.used, u.avg_seconds, u.stored, u.touched_at = float(r.used), r.avg_seconds, True, r.updated_at
    return list(users.values())


def keep(conn: Any, queue: str, users: list[UserState], lifted: dict[str, float], *, now: datetime) -> None:
    """Create the `fair_shares` rows of users released to for the first time (their completions
    count there), and raise the `used` of those `plan` lifted."""
    rows = {u.user_id: lifted.get(u.user_id, u.used) for u in users
            if u.user_id in lifted or (u.tasks and not u.stored)}
    if rows:
        conn.execute(_KEEP, {"queue": queue, "users": list(rows), "used": list(rows.values()), "now": now})



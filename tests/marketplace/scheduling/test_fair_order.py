"""The fair dispatcher's order (`scheduling.fair.plan`), on its own: who gets the next slots.

A small simulation drives it as the dispatcher does: slots free up as subtasks finish, each
finish adds its seconds to its user's `used`, and each free slot is filled by one `plan` call.
Expected shares are written from the issue's targets (25% each of four; 75% / 25% at 3:1).
"""
from __future__ import annotations

import heapq
from datetime import UTC, datetime, timedelta

from marketplace.scheduling.fair import TaskBacklog, UserState, plan

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _user(uid: str, *, share: float = 1.0, backlog: int = 1000, seconds: float | None = 1.0,
          cap: int | None = None, tasks: list[TaskBacklog] | None = None) -> UserState:
    return UserState(user_id=uid, share=share, cap=cap, avg_seconds=seconds,
                     tasks=tasks or [TaskBacklog(task_id=f"{uid}-job", priority=0, created_at=T0, backlog=backlog)])


def _simulate(users: dict[str, UserState], durations: dict[str, float], *, slots: int,
              horizon: float) -> dict[str, float]:
    """Slot-seconds each user got over `horizon` seconds of `slots` busy slots."""
    running: list[tuple[float, str]] = []  # (finish time, user)
    got = dict.fromkeys(users, 0.0)
    now = 0.0
    while now < horizon:
        free = slots - len(running)
        if free:
            planned = plan(free, list(users.values()))
            for uid, used in planned.lifted.items():  # what `fair.keep` writes
                users[uid].used = used
            for u in users.values():
                if u.user_id in planned.lifted or not u.stored:
                    u.stored, u.touched_at = True, T0 + timedelta(seconds=now)
            for uid in planned.order:
                users[uid].waiting -= 1  # sent, and a free slot takes it at once
                users[uid].running += 1
                heapq.heappush(running, (now + durations[uid], uid))
        now, uid = heapq.heappop(running)
        users[uid].running -= 1
        users[uid].used += durations[uid]  # the completion's statement
        users[uid].touched_at = T0 + timedelta(seconds=now)
        got[uid] += durations[uid]
    return {uid: seconds / sum(got.values()) for uid, seconds in got.items()}


def test_a_user_alone_gets_every_slot():
    users = [_user("a")]
    assert plan(7, users).picks == {"a-job": 7}


def test_four_users_with_equal_backlogs_each_get_a_quarter_of_the_slot_seconds():
    users = {u: _user(u) for u in "abcd"}
    shares = _simulate(users, dict.fromkeys("abcd", 1.0), slots=2, horizon=400)
    assert all(0.20 <= s <= 0.30 for s in shares.values()), shares


def test_shares_of_three_to_one_get_three_quarters_and_one_quarter():
    users = {"a": _user("a", share=3), "b": _user("b", share=1)}
    shares = _simulate(users, {"a": 1.0, "b": 1.0}, slots=2, horizon=400)
    assert 0.70 <= shares["a"] <= 0.80 and 0.20 <= shares["b"] <= 0.30, shares


def test_fairness_is_over_slot_seconds_not_subtask_counts():
    """A user whose subtasks take 4 s and one whose take 1 s share two slots half and half in
    time: the second runs about four subtasks for each of the first's."""
    users = {"slow": _user("slow", seconds=4.0), "fast": _user("fast", seconds=1.0)}
    shares = _simulate(users, {"slow": 4.0, "fast": 1.0}, slots=2, horizon=800)
    assert 0.40 <= shares["slow"] <= 0.60, shares


def test_a_newcomer_goes_before_a_big_jobs_backlog():
    """B's one-item job arrives while A has everything in flight: B's subtask is the next sent."""
    a = _user("a", backlog=40)
    a.running, a.used, a.stored, a.touched_at = 2, 30.0, True, T0
    b = _user("b", backlog=1, seconds=None)
    assert plan(1, [a, b]).order == ["b"]


def test_idling_banks_no_credit():
    """C was away while A used a hundred slot-seconds: back, it does not get every slot until it
    has caught up, but starts level with A (its `used` is raised, and kept)."""
    a = _user("a")
    a.running, a.used, a.stored, a.touched_at = 1, 100.0, True, T0 + timedelta(hours=1)
    c = _user("c", tasks=[TaskBacklog(task_id="c-job", priority=0, created_at=T0, backlog=10,
                                      scheduled_at=T0 + timedelta(hours=1))])
    c.stored, c.touched_at = True, T0  # its row was last touched an hour before its new job came
    planned = plan(4, [a, c])
    assert planned.order.count("c") <= 3, planned.order
    assert planned.lifted["c"] >= 100.0


def test_a_user_that_waits_starved_is_not_lifted():
    """D's job came when the slots were taken; its row was seen since: it keeps what it is owed."""
    a = _user("a")
    a.running, a.used, a.stored, a.touched_at = 2, 50.0, True, T0 + timedelta(minutes=5)
    d = _user("d", tasks=[TaskBacklog(task_id="d-job", priority=0, created_at=T0, backlog=10, scheduled_at=T0)])
    d.stored, d.touched_at = True, T0 + timedelta(seconds=1)
    planned = plan(2, [a, d])
    assert planned.order == ["d", "d"] and "d" not in planned.lifted


def test_within_a_users_share_priority_then_age_decide():
    old = TaskBacklog(task_id="old", priority=0, created_at=T0, backlog=2)
    urgent = TaskBacklog(task_id="urgent", priority=9, created_at=T0 + timedelta(minutes=5), backlog=2)
    new = TaskBacklog(task_id="new", priority=0, created_at=T0 + timedelta(minutes=9), backlog=2)
    picks = plan(5, [_user("a", tasks=[new, old, urgent])]).picks
    assert picks == {"urgent": 2, "old": 2, "new": 1}


def test_a_user_at_its_cap_gets_nothing_more_and_the_others_take_the_slots():
    capped = _user("capped", cap=2)
    capped.running = 1
    other = _user("other")
    other.stored = capped.stored = True
    planned = plan(6, [capped, other])
    assert planned.order.count("capped") == 1 and planned.order.count("other") == 5, planned.order

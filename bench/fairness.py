"""Fairness on two slots: a small job behind a big one, and shares of the slot-seconds.

    .venv/bin/python bench/fairness.py [--big 40] [--seconds 1.0]

On a node of two slots (control queues and cpu.generic, as `marketplace standalone` runs it):

- Small job behind a big one: user A submits `--big` one-item subtasks of `--seconds` each; 3 s
  later user B submits a one-item `echo` job, and again each time it is done, while A runs.
  B's submit-to-Done (p50) is printed next to the same job on an idle system, and A's job time
  next to A's alone. Targets: B within one of A's subtask durations plus 1 s; A <= 1.1x alone.
- Shares: four users with equal backlogs, then two with shares 3:1; each user's part of the
  slot-seconds while all of them had work waiting. Targets: 25% +- 5 each; 75% and 25% +- 5.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from harness import CONTROL, api_client, new_user, settle, stack, start_worker, wait_marketplace_ready, wait_task_done


def submit(client: Any, headers: dict[str, str], n: int, seconds: float) -> str:
    params = {"sleep_s": seconds} if seconds else {}
    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": list(range(n)), "batch_size": 1,
                                          "params": params}, headers=headers)
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()["id"]


def small_job(client: Any, headers: dict[str, str]) -> float:
    start = time.monotonic()
    status, seen = wait_task_done(submit(client, headers, 1, 0))
    assert status == "Done"
    return seen - start


def big_job_alone(client: Any, headers: dict[str, str], n: int, seconds: float) -> float:
    start = time.monotonic()
    status, seen = wait_task_done(submit(client, headers, n, seconds))
    assert status == "Done"
    return seen - start


def behind_a_big_job(client: Any, a: dict[str, str], b: dict[str, str], n: int, seconds: float
                     ) -> tuple[list[float], float]:
    start = time.monotonic()
    big = submit(client, a, n, seconds)
    time.sleep(3)
    waits = []
    from harness import _POLL  # noqa: F401  (the same poll as wait_task_done)

    while _status(big) not in ("Done", "Failed", "Cancelled"):
        waits.append(small_job(client, b))
        time.sleep(0.2)
    status, seen = wait_task_done(big)
    assert status == "Done"
    return waits, seen - start


def _status(task_id: str) -> str:
    from sqlalchemy import text

    from marketplace.infra.db import get_engine

    with get_engine().connect() as conn:
        return conn.execute(text("SELECT status FROM tasks WHERE id = :id"), {"id": task_id}).scalar()


def slot_seconds(task_ids: dict[str, str]) -> dict[str, float]:
    """Each user's share of the slot-seconds while every one of them still had work to start."""
    from sqlalchemy import text

    from marketplace.infra.db import get_engine

    with get_engine().connect() as conn:
        rows = conn.execute(text("""
            SELECT task_id::text AS task_id, started_at, finished_at FROM subtasks
            WHERE task_id = ANY(CAST(:ids AS uuid[])) AND started_at IS NOT NULL
        """), {"ids": list(task_ids.values())}).all()
    owner = {tid: name for name, tid in task_ids.items()}
    last_start = {name: max(r.started_at for r in rows if owner[r.task_id] == name) for name in task_ids}
    first_start = min(r.started_at for r in rows)
    end = min(last_start.values())  # from here on some user had nothing left to start
    used = dict.fromkeys(task_ids, 0.0)
    for r in rows:
        a, z = max(r.started_at, first_start), min(r.finished_at or end, end)
        if z > a:
            used[owner[r.task_id]] += (z - a).total_seconds()
    total = sum(used.values()) or 1.0
    return {name: seconds / total for name, seconds in used.items()}


def shares(client: Any, weights: dict[str, float], n: int, seconds: float) -> dict[str, float]:
    from marketplace.infra.db import session_scope
    from marketplace.users.models import User

    users = {name: new_user(client) for name in weights}
    with session_scope() as session:
        for name, headers in users.items():
            me = client.get("/v1/me", headers=headers).get_json()
            session.get(User, __import__("uuid").UUID(me["id"])).share = weights[name]
    jobs = {name: submit(client, headers, n, seconds) for name, headers in users.items()}
    for task_id in jobs.values():
        assert wait_task_done(task_id)[0] == "Done"
    return slot_seconds(jobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--big", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    with stack():
        node = start_worker(CONTROL + ["cpu.generic"], concurrency=2, name="fairness")
        wait_marketplace_ready(node)
        client = api_client()
        a, b = new_user(client), new_user(client)
        small_job(client, b)  # warm: the first job pays for connections
        idle = statistics.median(small_job(client, b) for _ in range(5))
        alone = big_job_alone(client, a, args.big, args.seconds)
        settle()
        waits, shared = behind_a_big_job(client, a, b, args.big, args.seconds)
        print(f"small job behind a big one ({args.big} x {args.seconds:g} s on 2 slots):")
        print(f"  B submit->Done p50  {statistics.median(waits):6.2f} s  (idle system {idle:.2f} s; "
              f"{len(waits)} jobs; max {max(waits):.2f} s)  target <= {args.seconds + 1:.1f} s")
        print(f"  A's job             {shared:6.2f} s  (alone {alone:.2f} s)  ratio {shared / alone:.2f}  "
              f"target <= 1.10")
        settle()
        equal = shares(client, dict.fromkeys("ABCD", 1.0), 30, 0.5)
        print("shares, four users of share 1 (target 25% +- 5 each): "
              + ", ".join(f"{k} {v:.1%}" for k, v in equal.items()))
        settle()
        weighted = shares(client, {"A": 3.0, "B": 1.0}, 60, 0.5)
        print("shares, two users of shares 3:1 (target 75% and 25% +- 5): "
              + ", ".join(f"{k} {v:.1%}" for k, v in weighted.items()))
        node.stop()


if __name__ == "__main__":
    main()

"""Latency: one single-item `echo` job, submit to Done, vs one plain Celery task round trip.

The marketplace side is `marketplace standalone` as shipped (`--mode private`: the bench's own
stack), the job submitted over its REST API; the round trip runs on the same Redis.

    .venv/bin/python bench/latency.py [--runs 50] [--mode standalone|private]
"""
from __future__ import annotations

import argparse
import statistics
import time

from harness import add_mode_argument, marketplace, new_user, settle, start_plain_worker, wait_task_done


def plain_round_trip() -> float:
    from celery.result import AsyncResult
    from plain_app import app, noop

    start = time.monotonic()
    r = AsyncResult(noop.delay(1).id, app=app)
    while not r.ready():
        time.sleep(0.002)
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=50)
    add_mode_argument(parser)
    args = parser.parse_args()
    with marketplace(args.mode) as mp:
        plain = start_plain_worker(2)
        mp.serve(["cpu.generic"], concurrency=2, name="latency")
        time.sleep(3)
        client = mp.client
        headers = new_user(client)

        job_ids: list[str] = []

        def job(i: int) -> float:
            start = time.monotonic()
            resp = client.post("/v1/tasks", json={"model": "echo", "inputs": [i]}, headers=headers)
            status, seen = wait_task_done(resp.get_json()["id"])
            assert status == "Done"
            job_ids.append(resp.get_json()["id"])
            return seen - start

        plain_round_trip()
        job(-1)
        # Interleaved blocks of 10 (this machine's speed drifts within minutes), each marketplace
        # block followed by its audit chaining (`settle`) so the next plain block does not pay for it.
        plain_times: list[float] = []
        times: list[float] = []
        settle()
        for block in range(0, args.runs, 10):
            plain_times += [plain_round_trip() for _ in range(block, min(args.runs, block + 10))]
            times += [job(i) for i in range(block, min(args.runs, block + 10))]
            settle()
        plain.stop()
        phases = _phases(job_ids[1:])
    where = mp.describe()
    mp, pl = statistics.median(times), statistics.median(plain_times)
    print(f"single-item job p50 {mp * 1000:.1f} ms vs plain Celery round trip p50 {pl * 1000:.1f} ms: "
          f"{mp / pl:.2f}x  ({args.runs} runs, {where})")
    print("  where a job's time goes, p50 ms (from the rows' timestamps): "
          + ", ".join(f"{name} {ms:.1f}" for name, ms in phases))


def _phases(task_ids: list[str]) -> list[tuple[str, float]]:
    """p50 of each step between the timestamps a job's rows record (all from this machine's clock)."""
    import uuid

    from sqlalchemy import text

    from marketplace.infra.db import get_engine

    query = text("SELECT t.created_at, t.scheduled_at, s.started_at, s.finished_at, t.finished_at "
                 "FROM tasks t JOIN subtasks s ON s.task_id = t.id WHERE t.id = :id")
    names = ("created -> Scheduled", "-> subtask started", "subtask run", "-> task finished")
    steps: list[list[float]] = [[] for _ in names]
    with get_engine().connect() as conn:
        for task_id in task_ids:
            row = conn.execute(query, {"id": uuid.UUID(task_id)}).one()
            for i in range(len(names)):
                steps[i].append((row[i + 1] - row[i]).total_seconds() * 1000)
    return [(name, statistics.median(values)) for name, values in zip(names, steps, strict=True)]


if __name__ == "__main__":
    main()

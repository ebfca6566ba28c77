"""Verified results: an `echo` job of N one-item subtasks with `redundancy: 2` vs the same job with
`redundancy: 1`, on the same two nodes.

The k = 2 job runs every subtask on both nodes (twice the work on the same slots), then the
aggregator judges each pair; its bookkeeping (distinct-node claims, swaps and redirects, the
quorum, reputations, events) is what this measures beyond the doubled work: the target is
<= 2.2x the k = 1 job. The marketplace is `marketplace standalone` as shipped (`--mode private`:
the bench's own stack) plus a second node on `cpu.generic` of the same concurrency; spot checks
are off (MARKETPLACE_SPOT_CHECK_RATE=0), so the k = 1 job does its work once. Runs interleave
(k=1, k=2, k=1, ...); prints wall time from submit to Done side by side and the ratio, and the
machine's CPU seconds per run (a k = 2 job makes 2N runs): on 2 busy cores the wall ratio drifts by
~10% between runs of the same code, while CPU per run says whether the bookkeeping grew.

    .venv/bin/python bench/redundancy.py [--n 1000] [--repeat 5] [--mode standalone|private]
"""
from __future__ import annotations

import argparse
import statistics
import time
import uuid

from harness import (
    CONTROL,
    add_mode_argument,
    marketplace,
    new_user,
    settle,
    start_worker,
    wait_marketplace_ready,
    wait_task_done,
)

POLL = 0.01
TARGET = 2.2


def busy_cpu() -> float:
    """CPU seconds every process on this machine has used (the stack's and this script's)."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def job(client, headers, n: int, k: int) -> tuple[float, str]:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": list(range(n)), "batch_size": 1,
                                          "redundancy": k}, headers=headers)
    assert resp.status_code == 202, resp.get_json()
    task_id = resp.get_json()["id"]
    status, seen = wait_task_done(task_id, every=POLL)
    assert status == "Done", status
    return seen - start, task_id


def check(client, headers, task_id: str, n: int) -> None:  # type: ignore[no-untyped-def]
    """The k = 2 job's result is every input, and each subtask ran on two distinct nodes."""
    from sqlalchemy import text

    from marketplace.infra.db import get_engine

    result = client.get(f"/v1/tasks/{task_id}/result", headers=headers).get_json()
    assert result["outputs"] == list(range(n)), "wrong outputs"
    with get_engine().connect() as conn:
        row = conn.execute(text("SELECT count(*) AS runs, count(DISTINCT (index, worker)) AS distinct_runs, "
                                "count(*) FILTER (WHERE agreed) AS agreed FROM subtasks WHERE task_id = :t"),
                           {"t": task_id}).one()
    assert (row.runs, row.distinct_runs, row.agreed) == (2 * n, 2 * n, 2 * n), row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=2)
    add_mode_argument(parser)
    args = parser.parse_args()
    with marketplace(args.mode, extra_env={"MARKETPLACE_SPOT_CHECK_RATE": "0"}) as mp:
        mp.serve(["cpu.generic"], concurrency=args.concurrency, name="mp")
        second = start_worker(CONTROL + ["cpu.generic"], concurrency=args.concurrency,
                              name=f"second-{uuid.uuid4().hex[:4]}", env={"MARKETPLACE_SPOT_CHECK_RATE": "0"})
        try:
            wait_marketplace_ready(second)
            time.sleep(3)
            client = mp.client
            headers = new_user(client)
            job(client, headers, 10, 1)  # warm the pool children
            job(client, headers, 10, 2)
            settle()
            solo: list[float] = []
            verified: list[float] = []
            cpu: dict[int, list[float]] = {1: [], 2: []}  # CPU seconds per run
            for _ in range(args.repeat):
                used = busy_cpu()
                solo.append(job(client, headers, args.n, 1)[0])
                cpu[1].append((busy_cpu() - used) / args.n)
                settle()
                used = busy_cpu()
                seconds, task_id = job(client, headers, args.n, 2)
                cpu[2].append((busy_cpu() - used) / (2 * args.n))
                verified.append(seconds)
                check(client, headers, task_id, args.n)
                settle()
        finally:
            second.stop()
    one, two = statistics.median(solo), statistics.median(verified)
    print(f"redundancy {mp.describe()} plus a second node (prefork -c {args.concurrency}) on cpu.generic; "
          f"spot checks off; median of {args.repeat}")
    print(f"{'n':>6} {'k=1 s':>9} {'k=2 s':>9} {'k=2/k=1':>8} {'target':>7}")
    print(f"{args.n:>6} {one:>9.2f} {two:>9.2f} {two / one:>7.2f}x {TARGET:>6.1f}x")
    c1, c2 = statistics.median(cpu[1]) * 1000, statistics.median(cpu[2]) * 1000
    print(f"machine CPU per run: k=1 {c1:.2f} ms, k=2 {c2:.2f} ms ({c2 / c1:.2f}x; 1.00x: the bookkeeping per run "
          "did not grow)")
    print("runs k=1: " + ", ".join(f"{s:.2f}" for s in solo) + "; k=2: " + ", ".join(f"{s:.2f}" for s in verified))


if __name__ == "__main__":
    main()

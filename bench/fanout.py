"""Fan-out: a marketplace `echo` job of N single-item subtasks vs a plain Celery chord of N no-ops.

The marketplace side is `marketplace standalone` as shipped (`--mode private`: the bench's own
stack), the job submitted over its REST API; the chord runs on the same Redis, on a plain Celery
worker of the same concurrency and Celery settings (celeryconfig.py), both up for the whole run and
the runs interleaved (plain, marketplace, plain, ...). Prints wall time from submit to Done and the ratio.

    .venv/bin/python bench/fanout.py [--n 10 100 1000] [--repeat 3] [--mode standalone|credentials|private]

`--mode credentials`: the same job run by a provider's node started from its credential alone.
"""
from __future__ import annotations

import argparse
import statistics
import time

from harness import add_mode_argument, marketplace, new_user, settle, start_plain_worker, wait_task_done

# Both sides look for the end every POLL seconds. The marketplace side used the harness's
# adaptive poll (2 ms early): ~1,000 PostgreSQL queries in a 3 s job against ~300 Redis GETs
# for the chord, each costing CPU that both jobs need on these 2 cores.
POLL = 0.01


def plain_chord(n: int) -> float:
    from celery import chord
    from plain_app import app, callback, noop

    start = time.monotonic()
    res = chord(noop.s(i) for i in range(n))(callback.si())
    # Poll only the callback's own id: waiting on the chord handle is O(N²) client work.
    from celery.result import AsyncResult

    r = AsyncResult(res.id, app=app)
    while not r.ready():
        time.sleep(POLL)
    return time.monotonic() - start


def marketplace_job(client, headers, n: int) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": list(range(n)), "batch_size": 1}, headers=headers)
    assert resp.status_code == 202, resp.get_json()
    status, seen = wait_task_done(resp.get_json()["id"], every=POLL)
    assert status == "Done", status
    return seen - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, nargs="+", default=[10, 100, 1000, 5000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2)
    add_mode_argument(parser)
    args = parser.parse_args()
    rows = []
    with marketplace(args.mode) as mp:
        plain = start_plain_worker(args.concurrency)
        mp.serve(["cpu.generic"], concurrency=args.concurrency, name="mp")
        time.sleep(3)
        client = mp.client
        headers = new_user(client)
        plain_chord(5)
        marketplace_job(client, headers, 5)  # warm the pool children
        # Interleaved, one run of each side after the other: this machine's speed drifts by 2x
        # within minutes (a shared VM), and back-to-back blocks would measure the drift. After each
        # marketplace job the run waits for its audit chaining (off the job's path, ~1 ms per
        # subtask, printed by billing_audit.py) so that neither side's next run pays for it.
        plain_times: dict[int, list[float]] = {n: [] for n in args.n}
        mp_times: dict[int, list[float]] = {n: [] for n in args.n}
        settle()
        for _ in range(args.repeat):
            for n in args.n:
                plain_times[n].append(plain_chord(n))
                mp_times[n].append(marketplace_job(client, headers, n))
                settle()
        plain.stop()
        for n in args.n:
            p, m = statistics.median(plain_times[n]), statistics.median(mp_times[n])
            rows.append((n, p, m, m / p))
    print(f"fan-out {mp.describe()}; plain chord on the same Redis, prefork -c {args.concurrency}")
    print(f"{'N':>6} {'plain chord s':>14} {'marketplace s':>14} {'ratio':>7}   (median of {args.repeat})")
    for n, p, m, ratio in rows:
        print(f"{n:>6} {p:>14.3f} {m:>14.3f} {ratio:>7.2f}")


if __name__ == "__main__":
    main()

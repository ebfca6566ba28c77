"""Batching: an `echo` job of 100,000 items with the model's default batch size, items/s end to end,
vs its plain baseline: a Celery chord of plain tasks carrying the same items in the same batches
(each returns its batch; the callback gets every part, in order, and joins them).

The marketplace side is `marketplace standalone` as shipped (`--mode private`: the bench's own
stack), the job submitted over its REST API; the chord runs on the same Redis on a plain Celery
worker of the same concurrency, the runs interleaved (plain, marketplace, ...).

    .venv/bin/python bench/batching.py [--items 100000] [--repeat 3] [--mode standalone|private]
"""
from __future__ import annotations

import argparse
import statistics
import time

from harness import add_mode_argument, marketplace, new_user, settle, start_plain_worker, wait_task_done


def plain_chord(inputs: list[int], batch: int) -> float:
    from celery import chord
    from celery.result import AsyncResult
    from plain_app import app, echo_batch, join

    start = time.monotonic()
    res = chord(echo_batch.s(inputs[i : i + batch]) for i in range(0, len(inputs), batch))(join.s())
    r = AsyncResult(res.id, app=app)  # the callback's own id: waiting on the chord handle is O(N^2)
    while not r.ready():
        time.sleep(0.01)
    assert r.get() == len(inputs)
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    add_mode_argument(parser)
    args = parser.parse_args()
    from marketplace.catalog import get_catalog

    batch = get_catalog().get("echo").batch_size
    inputs = list(range(args.items))
    with marketplace(args.mode) as mp:
        plain = start_plain_worker(2)
        mp.serve(["cpu.generic"], concurrency=2, name="batching")
        time.sleep(3)
        headers = new_user(mp.client)
        plain_chord(inputs[: batch * 2], batch)  # warm both sides' pool children
        wait_task_done(mp.client.post("/v1/tasks", json={"model": "echo", "inputs": inputs[: batch * 2]},
                                      headers=headers).get_json()["id"])
        settle()
        rates, plain_rates, subtasks = [], [], 0
        for _ in range(args.repeat):
            plain_rates.append(args.items / plain_chord(inputs, batch))
            start = time.monotonic()
            resp = mp.client.post("/v1/tasks", json={"model": "echo", "inputs": inputs}, headers=headers)
            assert resp.status_code == 202, resp.get_json()
            subtasks = resp.get_json()["subtasks"]
            status, seen = wait_task_done(resp.get_json()["id"])
            assert status == "Done", status
            rates.append(args.items / (seen - start))
            settle()
        plain.stop()
    mp_rate, plain_rate = statistics.median(rates), statistics.median(plain_rates)
    print(f"echo, {args.items} items in {subtasks} subtasks of {batch} (default batch size), {mp.describe()}")
    print(f"items/s end to end: marketplace median {mp_rate:,.0f} (best {max(rates):,.0f}) vs plain Celery chord "
          f"of the same batches {plain_rate:,.0f}: ratio {mp_rate / plain_rate:.2f}  (median of {args.repeat})")


if __name__ == "__main__":
    main()

"""Warm start: the first `embedding` job of 2,000 sentences after `marketplace standalone` says it is
ready, vs the same job once warm. A node announces `embedding` (and the standalone's /readyz says
ready) only once its pool processes have loaded the model and run one inference: the first job
should run at warm speed (target >= 0.9 of it).

    .venv/bin/python bench/warm_start.py [--sentences 2000] [--warm 3] [--mode standalone|private]
"""
from __future__ import annotations

import argparse
import statistics
import time

from harness import add_mode_argument, marketplace, new_user, settle, wait_task_done
from inference import sentences


def job(client, headers, texts: list[str]) -> float:  # type: ignore[no-untyped-def]
    """Items/s from submit to Done."""
    start = time.monotonic()
    resp = client.post("/v1/tasks", json={"model": "embedding", "inputs": texts, "device": "cpu"}, headers=headers)
    assert resp.status_code == 202, resp.get_json()
    status, seen = wait_task_done(resp.get_json()["id"], every=0.02)
    assert status == "Done", status
    return len(texts) / (seen - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--warm", type=int, default=3, help="warm jobs after the first (their median is compared)")
    add_mode_argument(parser)
    args = parser.parse_args()
    texts = sentences(args.sentences)
    with marketplace(args.mode) as mp:
        mp.serve(["cpu.embedding"], concurrency=2, name="warm")  # private mode: its node, once it is ready
        headers = new_user(mp.client)  # the account first: the job is what is measured
        first = job(mp.client, headers, texts)
        settle()
        warm = []
        for _ in range(args.warm):
            warm.append(job(mp.client, headers, texts))
            settle()
    rate = statistics.median(warm)
    print(f"embedding, {len(texts)} sentences, {mp.describe()}")
    print(f"first job after ready {first:,.0f} items/s vs warm {rate:,.0f} items/s (median of {args.warm}): "
          f"ratio {first / rate:.2f} (target >= 0.9)")


if __name__ == "__main__":
    main()

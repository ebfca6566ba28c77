"""Batching: an `echo` job of 100,000 items with the model's default batch size, items/s end to end.

    .venv/bin/python bench/batching.py [--items 100000] [--repeat 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

from harness import CONTROL, api_client, new_user, stack, start_worker, wait_marketplace_ready, wait_task_done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with stack():
        node = start_worker(CONTROL + ["cpu.generic"], concurrency=2, name="batching")
        wait_marketplace_ready(node)
        client = api_client()
        headers = new_user(client)
        inputs = list(range(args.items))
        rates, subtasks = [], 0
        for _ in range(args.repeat):
            start = time.monotonic()
            resp = client.post("/v1/tasks", json={"model": "echo", "inputs": inputs}, headers=headers)
            assert resp.status_code == 202, resp.get_json()
            subtasks = resp.get_json()["subtasks"]
            status, seen = wait_task_done(resp.get_json()["id"])
            assert status == "Done", status
            rates.append(args.items / (seen - start))
        node.stop()
    print(f"echo, {args.items} items, {subtasks} subtasks (default batch size), prefork -c 2")
    print(f"items/s end to end: median {statistics.median(rates):,.0f}  best {max(rates):,.0f}  (target >= 20,000)")


if __name__ == "__main__":
    main()

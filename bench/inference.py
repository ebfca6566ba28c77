"""Inference: `embedding` over 2,000 sentences through the marketplace (one worker, -c 2) vs the
same model called directly in one process with the same batch size. Prints items/s and the ratio.

The marketplace side is `marketplace standalone` as shipped (`--mode private`: the bench's own
stack), the job submitted over its REST API.

    .venv/bin/python bench/inference.py [--sentences 2000] [--mode standalone|private]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from harness import add_mode_argument, marketplace, new_user, wait_task_done

WORDS = "model data graph tensor cloud queue worker result vector token image sound river city music".split()


def sentences(n: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(8 + i % 9)) + f" #{i}" for i in range(n)]


def direct_executor(texts: list[str], batch: int):  # type: ignore[no-untyped-def]
    """The worker's own executor, loaded and warmed in this process."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from workers.executors.embedding import EmbeddingExecutor

    ex = EmbeddingExecutor("cpu")
    ex.warmup()
    ex.model().encode(texts[:batch], batch_size=batch)
    return ex


def direct(ex, texts: list[str], batch: int) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    for i in range(0, len(texts), batch):
        ex.run(texts[i : i + batch], {}, None)  # type: ignore[arg-type]
    return len(texts) / (time.monotonic() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    add_mode_argument(parser)
    args = parser.parse_args()
    from marketplace.catalog import get_catalog

    batch = get_catalog().get("embedding").batch_size
    texts = sentences(args.sentences)
    with marketplace(args.mode) as mp:
        mp.serve(["cpu.embedding"], concurrency=2, name="inference")
        client = mp.client
        headers = new_user(client)
        warm = client.post("/v1/tasks", json={"model": "embedding", "inputs": texts[: batch * 2], "device": "cpu"},
                           headers=headers).get_json()
        wait_task_done(warm["id"])  # both pool children have loaded the model
        executor = direct_executor(texts, batch)
        # Interleaved rounds (direct, marketplace, ...), medians: this machine's speed drifts within minutes.
        marketplace_rates, direct_rates = [], []
        for _ in range(args.rounds):
            direct_rates.append(direct(executor, texts, batch))
            start = time.monotonic()
            resp = client.post("/v1/tasks", json={"model": "embedding", "inputs": texts, "device": "cpu"},
                               headers=headers)
            # Every 20 ms (late by at most 0.3% of a ~7 s job): the adaptive 2-20 ms poll cost ~4% of
            # the two cores that the direct side, which polls nothing, has to itself.
            status, seen = wait_task_done(resp.get_json()["id"], every=0.02)
            assert status == "Done", status
            marketplace_rates.append(len(texts) / (seen - start))
    marketplace_rate, direct_rate = statistics.median(marketplace_rates), statistics.median(direct_rates)
    print(f"embedding, {len(texts)} sentences, batch {batch}: marketplace {marketplace_rate:,.0f} items/s "
          f"({mp.describe()}) vs direct {direct_rate:,.0f} items/s (1 process): ratio {marketplace_rate / direct_rate:.2f} "
          f"(target >= 0.9; median of {args.rounds} interleaved rounds)")


if __name__ == "__main__":
    main()

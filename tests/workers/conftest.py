"""Compute-node fixtures: start extra nodes inside a test."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.servers import CeleryWorker


@pytest.fixture()
def nodes(stack, redis_client) -> Iterator:  # type: ignore[no-untyped-def]
    """Start extra nodes in a test; every one is stopped afterwards."""
    started: list[CeleryWorker] = []

    def start(queues: list[str], **kwargs) -> CeleryWorker:  # type: ignore[no-untyped-def]
        node = CeleryWorker(queues, **kwargs)
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()
        redis_client.delete(f"marketplace:worker:{node.hostname}")

"""Kafka for the bridge tests: librdkafka's mock cluster, kept alive in a helper process."""
from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

MOCK_CLUSTER = r"""
import sys
from confluent_kafka import Producer
p = Producer({"test.mock.num.brokers": 1})
broker = next(iter(p.list_topics(timeout=10).brokers.values()))
print(f"{broker.host}:{broker.port}", flush=True)
sys.stdin.read()  # lives until the test process closes our stdin
"""


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """`host:port` of a mock Kafka cluster that other processes reach over TCP."""
    proc = subprocess.Popen([sys.executable, "-c", MOCK_CLUSTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert line, f"mock cluster did not start (exit {proc.poll()})"
        yield line
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def consume(bootstrap: str, topics: list[str], *, until: Any, timeout: float = 60.0) -> list[Any]:
    """Records of `topics` from the beginning until `until(records)` is true (or the timeout)."""
    from confluent_kafka import Consumer

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"test-{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe(topics)
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not until(out):
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            out.append(msg)
    finally:
        consumer.close()
    return out


def produce(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes]]) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap})
    errors: list[Any] = []
    for key, value in records:
        producer.produce(topic, key=key, value=value, on_delivery=lambda err, _m: errors.append(err))
    assert producer.flush(30) == 0
    assert errors == [None] * len(records), errors


@pytest.fixture(scope="session")
def kafka_consume(kafka_bootstrap: str) -> Any:
    return lambda topics, **kw: consume(kafka_bootstrap, topics, **kw)


@pytest.fixture(scope="session")
def kafka_produce(kafka_bootstrap: str) -> Any:
    return lambda topic, records: produce(kafka_bootstrap, topic, records)

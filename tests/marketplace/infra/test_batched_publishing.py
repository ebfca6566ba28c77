"""Publishing many messages: `batched_publishing` sends them in pipelined batches, and a group's
members are not watched for results (no SUBSCRIBE per subtask)."""
from __future__ import annotations

import uuid

import pytest
from kombu import Exchange, Queue


@pytest.fixture()
def queue(stack, redis_client):  # type: ignore[no-untyped-def]
    """A queue no worker consumes, on the test broker, known to the app by name."""
    from marketplace.infra.celery_app import app

    name = f"test.batch.{uuid.uuid4().hex[:8]}"
    yield app.amqp.queues.add(Queue(name, Exchange(name, type="direct"), routing_key=name))
    app.amqp.queues.pop(name, None)
    for key in redis_client.keys(f"{name}*"):
        redis_client.delete(key)


def _waiting(redis_client, queue: Queue) -> int:  # type: ignore[no-untyped-def]
    return sum(redis_client.llen(key) for key in redis_client.keys(f"{queue.name}*")
               if redis_client.type(key) == b"list")


def _send(queue: Queue, i: int) -> None:
    from marketplace.infra.celery_app import app

    app.send_task("test.batched", args=[i], queue=queue, ignore_result=True)


def test_messages_wait_for_the_batch_then_all_arrive_in_order(queue, redis_client):  # type: ignore[no-untyped-def]
    import json

    from marketplace.infra.celery_app import batched_publishing

    with batched_publishing(max_size=100):
        for i in range(5):
            _send(queue, i)
        assert _waiting(redis_client, queue) == 0
    assert _waiting(redis_client, queue) == 5
    ids = [json.loads(m)["headers"]["argsrepr"] for m in reversed(redis_client.lrange(queue.name, 0, -1))]
    assert ids == [f"[{i}]" for i in range(5)]


def test_a_full_batch_is_sent_before_the_block_ends(queue, redis_client):  # type: ignore[no-untyped-def]
    from marketplace.infra.celery_app import batched_publishing

    with batched_publishing(max_size=3):
        for i in range(7):
            _send(queue, i)
        assert _waiting(redis_client, queue) == 6  # two full batches; the seventh waits
    assert _waiting(redis_client, queue) == 7


def test_an_error_in_the_block_sends_nothing_more(queue, redis_client):  # type: ignore[no-untyped-def]
    from marketplace.infra.celery_app import batched_publishing

    with pytest.raises(RuntimeError), batched_publishing(max_size=100):
        _send(queue, 1)
        raise RuntimeError("dispatch failed")
    assert _waiting(redis_client, queue) == 0
    _send(queue, 2)  # outside any block: sent at once, as before
    assert _waiting(redis_client, queue) == 1


def test_a_nested_block_joins_the_outer_batch(queue, redis_client):  # type: ignore[no-untyped-def]
    from marketplace.infra.celery_app import batched_publishing

    with batched_publishing(max_size=100):
        with batched_publishing(max_size=1):
            _send(queue, 1)
            _send(queue, 2)
        assert _waiting(redis_client, queue) == 0
    assert _waiting(redis_client, queue) == 2


def test_a_chords_members_are_not_subscribed_to(queue, redis_client):  # type: ignore[no-untyped-def]
    from celery import chord, group, signature

    from marketplace.infra.celery_app import app

    header = group(signature("test.member", args=[i], queue=queue.name, ignore_result=True) for i in range(3))
    result = chord(header, signature("test.callback", queue=queue.name, immutable=True)).apply_async()
    members = [r.id for r in result.parent.results]
    assert len(members) == 3 and _waiting(redis_client, queue) == 3
    subscribed = {c.decode() for c in redis_client.pubsub_channels("celery-task-meta-*")}
    assert not subscribed & {f"celery-task-meta-{m}" for m in members}
    assert not app.backend.result_consumer.subscribed_to

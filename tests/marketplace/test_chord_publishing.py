"""Publishing large chords: `batched_publishing` sends messages in pipelined batches, and a
chord's members are not watched for results (no SUBSCRIBE per subtask)."""
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


def test_a_chords_counter_and_size_are_reset_in_one_round_trip(stack, redis_client, redis_round_trips):  # type: ignore[no-untyped-def]
    from marketplace.infra.celery_app import app
    from marketplace.infra.result_backend import RedisBackend

    backend = app.backend
    assert isinstance(backend, RedisBackend)  # celeryconfig.override_backends
    group_id = str(uuid.uuid4())
    counter, size = (backend.get_key_for_group(group_id, suffix) for suffix in (".c", ".s"))
    redis_client.set(counter, 2)  # a re-applied chord's old count
    backend.client.ping()  # the connection's own setup is not the chord's
    redis_round_trips.clear()
    backend.set_chord_size(group_id, 3)
    assert len(redis_round_trips) == 1
    assert redis_client.get(counter) is None
    assert redis_client.get(size) == b"3"
    assert 0 < redis_client.ttl(size) <= backend.chord_expires


def test_a_forgotten_chord_leaves_no_key_and_calls_nothing_back(queue, redis_client, redis_round_trips):  # type: ignore[no-untyped-def]
    """What a subtask that finished its task itself does with its chord (workers.tasks)."""
    from celery import chord, group, signature

    from marketplace.infra.celery_app import app

    callback = signature("test.callback", queue=queue.name, immutable=True)
    result = chord(group([signature("test.member", queue=queue.name, ignore_result=True)]), callback).apply_async()
    group_id = result.parent.id
    assert redis_client.exists(app.backend.get_key_for_group(group_id, ".s"))
    app.backend.client.ping()
    redis_round_trips.clear()
    app.backend.forget_chord(group_id)
    assert len(redis_round_trips) == 1
    assert not redis_client.keys(app.backend.get_key_for_group(group_id, "*"))
    # Its member counted anyway (a copy that ran late) would have completed the chord: it finds no
    # chord size, and sends no callback.
    member = type("Request", (), {"id": result.parent.results[0].id, "group": group_id, "group_index": 0,
                                  "chord": dict(callback), "ignore_result": True})()
    app.backend.on_chord_part_return(member, "SUCCESS", None)
    assert _waiting(redis_client, queue) == 1  # the member's own message; no callback

"""The broker transport: kombu's Redis transport with one command client per channel."""
from __future__ import annotations

import uuid


def test_publishes_reuse_one_redis_client_and_all_arrive(stack, redis_client):  # type: ignore[no-untyped-def]
    from marketplace.infra.broker_transport import Channel
    from marketplace.infra.celery_app import app

    queue = f"test.transport.{uuid.uuid4().hex[:8]}"
    try:
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            assert isinstance(channel, Channel)
            producer = conn.Producer(channel)
            clients = set()
            for i in range(5):
                producer.publish({"i": i}, routing_key=queue)
                clients.add(id(channel._command_client))
            assert len(clients) == 1, "each publish built a new redis client"
        assert redis_client.llen(queue) == 5
    finally:
        redis_client.delete(queue)


def test_a_replaced_pool_gets_a_new_client(stack):  # type: ignore[no-untyped-def]
    from marketplace.infra.celery_app import app

    with app.connection_for_write() as conn:
        channel = conn.default_channel
        with channel.conn_or_acquire() as first:
            pass
        channel._pool = None  # what kombu does when it drops a broken pool
        with channel.conn_or_acquire() as second:
            assert second is not first and second.connection_pool is channel.pool
        with channel.conn_or_acquire() as third:
            assert third is second


def test_broker_urls_still_read_as_redis(stack):  # type: ignore[no-untyped-def]
    """Flower picks its broker view by the URL's scheme."""
    from marketplace.infra.celery_app import app

    with app.connection_for_write() as conn:
        assert conn.as_uri().startswith("redis://")


def test_a_queue_is_declared_once_per_connection_and_its_messages_still_arrive(stack, redis_client):  # type: ignore[no-untyped-def]
    """Celery declares the queue with every publish; after the first, the producer answers from
    kombu's cache without building a retrying wrapper (Connection.ensure) for it."""
    from kombu import Exchange, Queue

    from marketplace.infra.celery_app import app

    name = f"test.declare.{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    try:
        with app.producer_or_acquire() as producer:
            assert isinstance(producer, app.amqp.Producer)
            ensured = []
            client = producer.channel.connection.client
            original = client.ensure

            def counting_ensure(*args, **kwargs):  # type: ignore[no-untyped-def]
                ensured.append(args)
                return original(*args, **kwargs)

            client.ensure = counting_ensure
            try:
                for i in range(3):
                    producer.publish({"i": i}, exchange=queue.exchange, routing_key=name, declare=[queue],
                                     retry=True)
            finally:
                del client.ensure
        declares = [a for a in ensured if len(a) > 1 and getattr(a[1], "__name__", "") == "_maybe_declare"]
        assert len(declares) == 1, f"the queue was declared through ensure {len(declares)} times"
        assert redis_client.llen(name) == 3
    finally:
        redis_client.delete(name)

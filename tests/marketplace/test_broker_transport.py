"""The broker transport: kombu's Redis transport with one command client per channel."""
from __future__ import annotations

import uuid


def test_publishes_reuse_one_redis_client_and_all_arrive(stack, redis_client):  # type: ignore[no-untyped-def]
    from marketplace.broker_transport import Channel
    from marketplace.celery_app import app

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
    from marketplace.celery_app import app

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
    from marketplace.celery_app import app

    with app.connection_for_write() as conn:
        assert conn.as_uri().startswith("redis://")

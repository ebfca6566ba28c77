"""kombu's Redis transport, with one reused client per channel for the commands it sends outside
its consumer loop (publishes, events, acks, queue sizes).

Stock kombu builds a new `redis.Redis` for each of those (`Channel.conn_or_acquire`): ~60 µs of
constructor per message here (redis-py copies its response-callback tables each time), paid
by every publish, every worker event and every ack. The client holds no socket of its own:
each command still borrows a connection from the channel's pool, so sharing it is as
thread-safe as the pool, and a pool that kombu replaces gets a new client.

`install()` (called by marketplace.celery_app) makes it kombu's `redis://` and `rediss://`
transport, so broker URLs, Flower's broker view and `celery inspect` read as stock Redis ones.

`AMQP` is the app's messaging class with `Producer`, whose declarations look at kombu's
cache of declared queues before anything else (see `Producer.maybe_declare`).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import kombu
from celery.app import amqp as celery_amqp
from kombu import transport as kombu_transport
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _command_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        reused = self._command_client
        if reused is None or reused.connection_pool is not self.pool:
            reused = self._command_client = self._create_client()
        yield reused


    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        """A credentialed node reads its queues' bindings, which the platform declared at its
        enrollment (its broker user may not write them: a binding routes the platform's publishes)."""
        from marketplace.settings import get_settings

        if not get_settings().is_node or self.typeof(exchange).type == "fanout":
            return super()._queue_bind(exchange, routing_key, pattern, queue)  # type: ignore[no-any-return]
        member = self.sep.join([routing_key or "", pattern or "", queue or ""])
        with self.conn_or_acquire() as client:
            if not client.sismember(self.keyprefix_queue % (exchange,), member):
                raise RuntimeError(f"queue {queue} is not declared on the broker: the platform declares a node's "
                                   "queues when it enrolls or rotates it")
        return None


class Transport(kombu_redis.Transport):
    Channel = Channel


class Producer(kombu.Producer):
    def maybe_declare(self, entity: Any, retry: bool = False, **retry_policy: Any) -> Any:
        """Celery declares the target queue with every publish, with retries. kombu 5.7 wraps
        that in a retrying `Connection.ensure` before it looks at its cache of what this
        connection already declared (measured: a fifth of a chord dispatch's CPU, for a
        declaration that is cached after the first message). Look at the cache first."""
        channel = self.channel
        if (entity and channel is not None and channel.connection is not None and entity.can_cache_declaration
                and hash(entity) in channel.connection.client.declared_entities):
            return False
        return super().maybe_declare(entity, retry, **retry_policy)


class AMQP(celery_amqp.AMQP):  # type: ignore[misc]
    Producer = Producer

    @property
    def producer_pool(self) -> Any:
        # Celery takes its pool from kombu's global registry, which builds stock producers.
        pool = super().producer_pool
        pool.Producer = Producer
        return pool


def install() -> None:
    for scheme in ("redis", "rediss"):
        kombu_transport.TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"

"""kombu's Redis transport, with one reused client per channel for the commands it sends outside
its consumer loop (publishes, events, acks, queue sizes).

Stock kombu builds a new `redis.Redis` for each of those (`Channel.conn_or_acquire`): ~60 µs of
constructor per message here (redis-py copies its response-callback tables each time), paid
by every publish, every worker event and every ack. The client holds no socket of its own:
each command still borrows a connection from the channel's pool, so sharing it is as
thread-safe as the pool, and a pool that kombu replaces gets a new client.

`install()` (called by marketplace.celery_app) makes it kombu's `redis://` and `rediss://`
transport, so broker URLs, Flower's broker view and `celery inspect` read as stock Redis ones.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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


class Transport(kombu_redis.Transport):
    Channel = Channel


def install() -> None:
    for scheme in ("redis", "rediss"):
        kombu_transport.TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"

"""The process-wide Redis client for our own state (heartbeats, token blocklist, limits)."""
from __future__ import annotations

import redis

_client: redis.Redis | None = None


def get_redis() -> redis.Redis:
    global _client
    if _client is None:
        from marketplace.settings import get_settings

        if get_settings().is_node:
            raise RuntimeError("a credentialed node has no Redis of the platform's but its broker user")
        _client = redis.Redis.from_url(
            get_settings().redis_url, socket_connect_timeout=3, socket_timeout=5, health_check_interval=15
        )
    return _client


def reset_redis() -> None:
    global _client
    if _client is not None:
        _client.close()
    _client = None

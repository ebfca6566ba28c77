"""Read-only views of the Celery broker (Redis): how many messages wait in a queue."""
from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any

import redis

_client: tuple[int, str, redis.Redis] | None = None
# When recovery last found the broker emptied (ISO time); kept in the broker itself.
LOST_AT_KEY = "marketplace:broker:lost-at"


def broker_redis() -> redis.Redis | None:
    """A client for the broker's Redis (it may differ from our state Redis), per process and URL;
    None when the broker is not Redis."""
    global _client
    from marketplace.settings import get_settings

    configured = url = get_settings().celery_broker_url
    if _client is not None and _client[:2] == (os.getpid(), configured):
        return _client[2]
    if url.startswith("redis+socket://"):
        url = "unix://" + url[len("redis+socket://"):]
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=5)
    _client = (os.getpid(), configured, client)
    return client


def broker_lists(queue: str, transport_options: dict[str, Any]) -> list[str]:
    """The Redis lists kombu keeps one queue in: `<queue>` and `<queue><sep><step>` for steps > 0."""
    sep = transport_options.get("sep", "\x06\x16")
    steps = transport_options.get("priority_steps") or [0, 3, 6, 9]
    return [queue if not step else f"{queue}{sep}{step}" for step in sorted(set(steps))]


def _config() -> Any:
    """The Celery settings module (the app is configured from it; read here without the app)."""
    import celeryconfig

    return celeryconfig


def queue_depths(queues: list[str], client: redis.Redis | None = None) -> dict[str, int]:
    """Messages waiting in each queue, summed over its priority lists (one pipelined round trip)."""
    client = client or broker_redis()
    if client is None or not queues:
        return {}
    options = dict(_config().broker_transport_options or {})
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        for name in broker_lists(queue, options):
            pipe.llen(name)
    lengths = iter(pipe.execute())
    return {queue: int(sum(next(lengths) for _ in broker_lists(queue, options))) for queue in queues}


def queue_depth_and_flag(queue: str, flag: str, client: redis.Redis | None = None,
                         also: list[str] | None = None) -> tuple[int, bool]:
    """Messages waiting in `queue` (and the queues `also`) and whether the key `flag` exists, in
    one pipelined round trip."""
    client = client or broker_redis()
    if client is None:
        return 0, False
    options = dict(_config().broker_transport_options or {})
    names = [name for q in [queue, *(also or [])] for name in broker_lists(q, options)]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.llen(name)
    pipe.exists(flag)
    *lengths, exists = pipe.execute()
    return int(sum(lengths)), bool(exists)


def lost_before(now: datetime, client: redis.Redis | None = None) -> datetime | None:
    """When the broker's Redis was last found emptied (FLUSHALL, a restart without persistence):
    every message published before then is gone, even where a queue holds newer ones.

    Call it before `maintenance.redeclare_queues`: recovery declares every queue on each sweep,
    so a queue binding missing on the next one was lost with everything else. (On a broker
    where some queue was never declared, the first sweep says so too: at worst it re-sends
    stalled subtasks once, and a copy never runs a subtask twice.) A loss found now is dated
    `now`, the sweep's own clock: what the sweep itself sends or touches is after it.
    """
    client = client or broker_redis()
    if client is None:
        return None
    config = _config()
    prefix = (config.broker_transport_options or {}).get("global_keyprefix", "")
    bindings = {f"{prefix}_kombu.binding.{queue.exchange.name}" for queue in config.task_queues}
    if client.exists(*bindings) < len(bindings):
        client.set(LOST_AT_KEY, now.isoformat())
    value = client.get(LOST_AT_KEY)
    return datetime.fromisoformat(value.decode()) if value else None


def held_since(before: datetime, client: redis.Redis | None = None) -> set[str]:
    """Celery task ids of the messages a consumer took before `before` and never acknowledged.

    kombu keeps them in its `unacked` hash and returns them to their queue only after
    `visibility_timeout` (an hour here): for a node that died holding one (a reserved
    message, or a retry waiting out its countdown) that is an hour of waiting.
    """
    client = client or broker_redis()
    if client is None:
        return set()
    options = _config().broker_transport_options or {}
    prefix = options.get("global_keyprefix", "")
    tags = client.zrangebyscore(prefix + options.get("unacked_index_key", "unacked_index"), "-inf",
                                before.timestamp())
    if not tags:
        return set()
    ids = set()
    for raw in client.hmget(prefix + options.get("unacked_key", "unacked"), tags):
        try:
            ids.add(str(json.loads(raw)[0]["headers"]["id"]))  # [message, exchange, routing key]
        except (TypeError, ValueError, KeyError, IndexError):
            continue  # acknowledged meanwhile, or not a Celery message
    return ids

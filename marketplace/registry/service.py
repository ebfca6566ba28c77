"""Worker Manager: nodes announce themselves and heartbeat into Redis; a missed TTL = offline."""
from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from typing import Any

import redis

from marketplace.settings import get_settings

logger = logging.getLogger(__name__)
KEY_PREFIX = "marketplace:worker:"


def _key(hostname: str) -> str:
    return f"{KEY_PREFIX}{hostname}"


def heartbeat(r: redis.Redis, *, info: dict[str, Any]) -> None:
    """Write the node's live record; it expires unless refreshed within the TTL."""
    settings = get_settings()
    doc = {**info, "last_heartbeat": time.time()}
    r.set(_key(info["hostname"]), json.dumps(doc), px=int(settings.heartbeat_ttl * 1000))


def deregister(r: redis.Redis, *, hostname: str) -> None:
    r.delete(_key(hostname))


def live_workers(r: redis.Redis) -> list[dict[str, Any]]:
    keys = list(r.scan_iter(match=f"{KEY_PREFIX}*", count=500))
    if not keys:
        return []
    out = []
    for raw in r.mget(keys):
        if raw:
            try:
                out.append(json.loads(raw))
            except ValueError:
                logger.warning("registry: unreadable worker record")
    return out


def live_capacity(r: redis.Redis) -> dict[str, int]:
    """Queue -> total concurrency of live nodes consuming it."""
    capacity: dict[str, int] = defaultdict(int)
    for worker in live_workers(r):
        for queue in worker.get("queues", []):
            capacity[queue] += int(worker.get("concurrency") or 1)
    return dict(capacity)

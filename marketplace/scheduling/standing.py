"""Who a queue's live nodes are: their providers and their standing, read a moment per process.

Verified results spread a batch's replicas over nodes of distinct providers where the queue has
enough of them (`replicas.place`, `lifecycle.work`): an enrolled node is its provider's (`nodes`),
the operator's own nodes are one provider, the platform. And the best-scored nodes of a queue get
its solo work while they have room (`better_free`): a node that has disagreed claims solo work only
when no node scoring better by `MARKETPLACE_REPUTATION_MARGIN` has a free slot in its heartbeat.

Both are asked only off the claim's one-statement path (a release of verified work, a claim that
statement refused), never for each subtask.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text

from marketplace.infra.db import get_engine

logger = logging.getLogger(__name__)
PLATFORM = ""  # the provider of the operator's own nodes (not enrolled)
CACHE_S = 1.0  # how long a process keeps what it read of a queue's nodes
_nodes: dict[str, tuple[float, list[LiveNode]]] = {}  # queue -> (read at, nodes), per process
_scores: dict[str, tuple[float, dict[str, float]]] = {}  # queue -> (read at, {node: preference})

_PROVIDERS = text("SELECT hostname, provider_id::text FROM nodes WHERE hostname = ANY(:names)")
_RECORDS = text("SELECT worker, agreed, disagreed, demoted FROM node_reputation WHERE worker = ANY(:names)")


@dataclass(frozen=True)
class LiveNode:
    hostname: str
    provider: str  # the provider user's id; PLATFORM for the operator's nodes
    queue: str
    record: dict[str, Any] = field(compare=False)  # its last heartbeat

    def serves(self, model: str | None) -> bool:
        from marketplace.registry.service import serves

        return serves(self.record, self.queue, model)

    @property
    def free(self) -> int:
        """Slots its last heartbeat left free."""
        return int(self.record.get("concurrency") or 1) - int(self.record.get("running") or 0)


def queue_nodes(queue: str, *, fresh: bool = False) -> list[LiveNode]:
    """The live nodes consuming `queue`, in name order, with their providers (cached CACHE_S).
    `fresh`: read now, for a decision that outlives the moment (a task's spread over providers:
    a view from before a provider's node came online would keep its replicas off that node)."""
    now = time.monotonic()
    read_at, nodes = _nodes.get(queue, (-CACHE_S, []))
    if now - read_at < CACHE_S and not fresh:
        return nodes
    from marketplace.infra.redis_client import get_redis
    from marketplace.registry.service import live_workers

    try:
        live = sorted((w for w in live_workers(get_redis()) if w.get("hostname") and queue in (w.get("queues") or [])),
                      key=lambda w: w["hostname"])
        names = [w["hostname"] for w in live]
        with get_engine().connect() as conn:
            enrolled = dict(conn.execute(_PROVIDERS, {"names": names}).all()) if names else {}
    except Exception:  # as if none were live: the shared queue, and no provider spread
        logger.warning("could not read the nodes of %s", queue, exc_info=True)
        live, enrolled = [], {}
    nodes = [LiveNode(w["hostname"], enrolled.get(w["hostname"]) or PLATFORM, queue, w) for w in live]
    _nodes[queue] = (now, nodes)
    return nodes


def providers(queue: str, model: str | None = None, *, fresh: bool = False) -> int:
    """How many distinct providers have a live node on `queue` (that runs `model`, when given)."""
    return len({n.provider for n in queue_nodes(queue, fresh=fresh) if model is None or n.serves(model)})


def preference(agreed: int, disagreed: int) -> float:
    """A node's rank for solo work: its score (`reputation.wilson_lower_bound`) once it has
    disagreed; a node never found disagreeing ranks first (1.0), judged or not."""
    from marketplace.registry.reputation import wilson_lower_bound

    return 1.0 if disagreed <= 0 else wilson_lower_bound(agreed, agreed + disagreed)


def preferences(queue: str) -> dict[str, float]:
    """{node: preference} of `queue`'s live nodes that are not demoted (cached CACHE_S)."""
    now = time.monotonic()
    read_at, scores = _scores.get(queue, (-CACHE_S, {}))
    if now - read_at < CACHE_S:
        return scores
    names = [n.hostname for n in queue_nodes(queue)]
    with get_engine().connect() as conn:
        records = {r.worker: r for r in conn.execute(_RECORDS, {"names": names})} if names else {}
    scores = {h: preference(records[h].agreed, records[h].disagreed) if h in records else 1.0
              for h in names if not (h in records and records[h].demoted)}
    _scores[queue] = (now, scores)
    return scores


def better_free(queue: str, model: str, *, node: str, agreed: int, disagreed: int) -> str | None:
    """A live node of `queue` that runs `model`, scores better than `node` (this record) by more than
    the margin and has a free slot: the best such one; None when `node` may take solo work."""
    from marketplace.settings import get_settings

    bar = preference(agreed, disagreed) + get_settings().reputation_margin
    scores = preferences(queue)
    better = [(scores[n.hostname], n.free, n.hostname) for n in queue_nodes(queue)
              if n.hostname != node and scores.get(n.hostname, 0.0) > bar and n.free > 0 and n.serves(model)]
    return max(better)[2] if better else None

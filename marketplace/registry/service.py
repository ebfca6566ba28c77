"""Worker Manager: nodes announce themselves and heartbeat into Redis; a missed TTL = offline.

Liveness is the Redis key `marketplace:worker:<hostname>` (it expires unless the
node refreshes it); the `workers` table is the durable history (registered,
last seen, deregistered) so `GET /v1/workers` can also show nodes that left.
"""
from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import redis
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from marketplace.catalog import Catalog, get_catalog
from marketplace.infra.db import utcnow
from marketplace.registry.models import Worker
from marketplace.settings import get_settings

if TYPE_CHECKING:
    from marketplace.users.models import User

logger = logging.getLogger(__name__)
KEY_PREFIX = "marketplace:worker:"
OFFLINE_VISIBLE = timedelta(hours=24)  # how long a departed node stays listed


INDEX_KEY = "marketplace:workers"  # set of hostnames that have heartbeated; stale ones pruned on read


def _key(hostname: str) -> str:
    return f"{KEY_PREFIX}{hostname}"


def heartbeat(r: redis.Redis, *, info: dict[str, Any]) -> None:
    """Write the node's live record; it expires unless refreshed within the TTL."""
    settings = get_settings()
    doc = {**info, "last_heartbeat": time.time()}
    pipe = r.pipeline(transaction=False)
    pipe.set(_key(info["hostname"]), json.dumps(doc), px=int(settings.heartbeat_ttl * 1000))
    pipe.sadd(INDEX_KEY, info["hostname"])
    pipe.execute()


def heartbeat_record(r: redis.Redis, *, hostname: str) -> dict[str, Any] | None:
    """The node's live record (its last heartbeat), None once it missed the TTL or deregistered."""
    raw = r.get(_key(hostname))
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def deregister(r: redis.Redis, *, hostname: str) -> None:
    pipe = r.pipeline(transaction=False)
    pipe.delete(_key(hostname))
    pipe.srem(INDEX_KEY, hostname)
    pipe.execute()


def claim_alive(r: redis.Redis, *, hostname: str, incarnation: str | None) -> bool:
    """Whether the node process that claimed work as `hostname` (`incarnation`: its id, None for a
    claim that recorded none) may still be running it: the node's heartbeat is current and, where
    both sides know theirs, names that process. A node restarted under the same name heartbeats a
    new incarnation at once: its predecessor is known dead without waiting for the TTL."""
    raw = r.get(_key(hostname))
    if raw is None:
        return False
    live = incarnation_of(raw)
    return not incarnation or not live or live == incarnation


def incarnation_of(record: str | bytes | dict[str, Any]) -> str | None:
    """The process id a live record carries (None from a node that heartbeats none)."""
    if not isinstance(record, dict):
        try:
            record = json.loads(record)
        except ValueError:
            return None
    value = record.get("incarnation") if isinstance(record, dict) else None
    return str(value) if value else None


# The index and the records in one round trip (every scheduling step asks): SMEMBERS, then an MGET
# of the keys it names. The keys are built in the script, so this wants one Redis, not a cluster,
# which is what the broker and registry are.
_LIVE_RECORDS = f"""
local names = redis.call('SMEMBERS', KEYS[1])
if #names == 0 then return {{{{}}, {{}}}} end
local keys = {{}}
for i, name in ipairs(names) do keys[i] = '{KEY_PREFIX}' .. name end
return {{names, redis.call('MGET', unpack(keys))}}
"""


def live_workers(r: redis.Redis) -> list[dict[str, Any]]:
    """The nodes whose heartbeat is current: the index set and its records, read by one script.

    Never a SCAN: every scheduling step asks, and the broker's Redis also holds a key
    per task result, so walking the keyspace grew with the traffic."""
    names, records = r.register_script(_LIVE_RECORDS)(keys=[INDEX_KEY])
    if not names:
        return []
    names = [n.decode() if isinstance(n, bytes) else n for n in names]
    pairs = sorted(zip(names, records, strict=True))
    out, expired = [], []
    for name, raw in pairs:
        if raw is None:
            expired.append(name)
            continue
        try:
            out.append(json.loads(raw))
        except ValueError:
            logger.warning("registry: unreadable worker record for %s", name)
    if expired:  # missed its TTL: offline; the sweep job records it in the database
        r.srem(INDEX_KEY, *expired)
    return out


def serves(worker: dict[str, Any], queue: str, model: str | None = None) -> bool:
    """Whether a live record consumes `queue` and (if given) can run `model` there.

    A node lists models it refuses in `unavailable` (e.g. `generic` with no
    sandbox) while still consuming the shared queue for the others (`echo`).
    """
    if queue not in (worker.get("queues") or []):
        return False
    return model is None or model not in (worker.get("unavailable") or {})


def live_capacity(r: redis.Redis | None, *, model: str | None = None,
                  workers: list[dict[str, Any]] | None = None) -> dict[str, int]:
    """Queue -> total concurrency of live nodes consuming it (and able to run `model`); from
    `workers` when given (one registry read for many tasks), else read from `r`."""
    capacity: dict[str, int] = defaultdict(int)
    if workers is None:
        assert r is not None, "live_capacity needs the registry or the workers read from it"
        workers = live_workers(r)
    for worker in workers:
        for queue in worker.get("queues", []):
            if serves(worker, queue, model):
                capacity[queue] += int(worker.get("concurrency") or 1)
    return dict(capacity)


def _ts(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, tz=UTC) if value else None


def record_online(session: Session, *, info: dict[str, Any]) -> None:
    """Upsert the durable row of a node that (re)started."""
    now = utcnow()
    facts = {**(info.get("facts") or {}), "unavailable": info.get("unavailable") or {}}
    values = {
        "hostname": info["hostname"], "queues": list(info.get("queues") or []),
        "models": list(info.get("models") or []), "facts": facts,
        "concurrency": int(info.get("concurrency") or 1), "status": "online",
        "registered_at": now, "last_heartbeat": now, "deregistered_at": None,
    }
    stmt = pg_insert(Worker).values(**values)
    stmt = stmt.on_conflict_do_update(
        index_elements=[Worker.hostname],
        set_={k: stmt.excluded[k] for k in values if k != "hostname"},
    )
    session.execute(stmt)


def record_offline(session: Session, *, hostname: str, at: datetime | None = None) -> bool:
    """Mark a node offline (clean shutdown or missed TTL); False if it was not online."""
    row = session.get(Worker, hostname, with_for_update=True)
    if row is None or row.status == "offline":
        return False
    row.status = "offline"
    row.deregistered_at = at or utcnow()
    return True


def sweep(session: Session, *, r: redis.Redis) -> dict[str, list[str]]:
    """Reconcile the table with Redis: refresh live rows, mark expired ones offline."""
    live = {w["hostname"]: w for w in live_workers(r)}
    report: dict[str, list[str]] = {"offline": [], "refreshed": []}
    for row in session.scalars(select(Worker).where(Worker.status == "online").with_for_update(skip_locked=True)):
        doc = live.get(row.hostname)
        if doc is None:
            row.status = "offline"
            row.deregistered_at = utcnow()
            report["offline"].append(row.hostname)
        else:
            row.last_heartbeat = _ts(doc.get("last_heartbeat")) or row.last_heartbeat
            report["refreshed"].append(row.hostname)
    known = set(session.scalars(select(Worker.hostname).where(Worker.hostname.in_(list(live)))))
    for hostname, doc in live.items():
        if hostname not in known:  # registered while the database was unreachable
            record_online(session, info=doc)
            report["refreshed"].append(hostname)
    if report["offline"]:
        logger.warning("registry: nodes missed their heartbeat, now offline: %s", ", ".join(report["offline"]))
    return report


def _live_doc(doc: dict[str, Any]) -> dict[str, Any]:
    concurrency = int(doc.get("concurrency") or 1)
    running = int(doc.get("running") or 0)
    return {
        "hostname": doc["hostname"], "queues": doc.get("queues") or [], "models": doc.get("models") or [],
        "status": "online", "capacity": concurrency, "running": running,
        "free": max(0, concurrency - running),
        "last_heartbeat": _ts(doc.get("last_heartbeat")).isoformat() if doc.get("last_heartbeat") else None,
        "unavailable": doc.get("unavailable") or {},
        "facts": doc.get("facts") or {},
    }


# What every user sees of a node: where work can go and how busy it is. The rest, its `facts`
# (platform and kernel, memory, CPUs, GPUs) and the reasons it refuses a model (they name install
# paths and packages), tells an attacker about the machine, and is for admins.
PUBLIC_FIELDS = ("hostname", "queues", "models", "status", "capacity", "running", "free", "last_heartbeat",
                 "deregistered_at", "provider", "node", "reputation")
REFUSED_FOR_USERS = "not run on this node"
# The reason a node gives for a model its pool is still loading (`workers/node.py`): it announces
# the model once loaded. Shown to every user as is (it names nothing of the machine).
LOADING = "still loading the model (warm-up)"


def node_view(doc: dict[str, Any], *, details: bool) -> dict[str, Any]:
    """A `list_workers` document as its viewer may see it: whole with `details`, else the public
    fields, and `unavailable` naming the refused models without the reasons."""
    if details:
        return doc
    out = {name: doc[name] for name in PUBLIC_FIELDS if name in doc}
    out["unavailable"] = {model: LOADING if reason == LOADING else REFUSED_FOR_USERS
                          for model, reason in (doc.get("unavailable") or {}).items()}
    return out


def _owners(session: Session, hostnames: list[str]) -> dict[str, dict[str, str]]:
    """{hostname: {node, provider, provider_id}} of the enrolled nodes among `hostnames` (the
    `nodes` table, `marketplace.providers`; read here by name, as that package depends on this one)."""
    from sqlalchemy import bindparam, text

    if not hostnames:
        return {}
    rows = session.execute(text(
        "SELECT n.hostname, n.name, u.email, n.provider_id FROM nodes n JOIN users u ON u.id = n.provider_id "
        "WHERE n.hostname IN :hostnames").bindparams(bindparam("hostnames", expanding=True)),
        {"hostnames": hostnames})
    return {h: {"node": n, "provider": email, "provider_id": str(pid)} for h, n, email, pid in rows}


def list_workers(session: Session, *, r: redis.Redis, viewer: User | None, status: str | None = None,
                 queue: str | None = None) -> list[dict[str, Any]]:
    """Live nodes from Redis, plus nodes that left within the last day from the table; only those
    with `status` (online/offline) and consuming `queue` when given (REST and gRPC filter alike).
    `viewer`: who asks; only an admin, or None for the operator's own tools, sees each node's
    details (`node_view`).

    Status is derived from the heartbeat key, not the row: a node whose key
    expired is offline even before the sweep job has written that down.
    """
    live = {w["hostname"]: _live_doc(w) for w in live_workers(r) if w.get("hostname")}
    out = list(live.values())
    if status != "online":
        since = utcnow() - OFFLINE_VISIBLE
        rows = session.scalars(
            select(Worker).where(Worker.last_heartbeat >= since).order_by(Worker.hostname)
        )
        for row in rows:
            if row.hostname in live:
                continue
            facts = dict(row.facts or {})
            unavailable = facts.pop("unavailable", {})
            out.append({
                "hostname": row.hostname, "queues": row.queues, "models": row.models, "status": "offline",
                "capacity": 0, "running": 0, "free": 0,
                "last_heartbeat": row.last_heartbeat.isoformat() if row.last_heartbeat else None,
                "deregistered_at": row.deregistered_at.isoformat() if row.deregistered_at else None,
                "unavailable": unavailable, "facts": facts,
            })
    out = [w for w in out if (status is None or w["status"] == status)
           and (queue is None or queue in (w.get("queues") or []))]
    # Whose node each is: a provider's enrolled node names its provider; the operator's own, none.
    owners = _owners(session, [w["hostname"] for w in out])
    for w in out:
        owner = owners.get(w["hostname"])
        w["provider"] = owner["provider_id"] if owner else None  # the provider's user id; admins: its email too
        w["node"] = owner["node"] if owner else None
        if owner:
            w["provider_email"] = owner["provider"]
    # Its standing from replicas judged against their quorum (verified results).
    from marketplace.registry import reputation

    standing = reputation.of(session, [w["hostname"] for w in out])
    for w in out:
        w["reputation"] = standing.get(w["hostname"]) or reputation.new_node()
    details = viewer is None or viewer.is_admin
    return [node_view(w, details=details) for w in sorted(out, key=lambda w: (w["status"] != "online", w["hostname"]))]


def catalog_entries(*, r: redis.Redis, catalog: Catalog | None = None) -> list[dict[str, Any]]:
    """The public catalog, each model with its live workers per queue."""
    from marketplace.tasks.params import PARAMS

    catalog = catalog or get_catalog()
    workers = live_workers(r)
    out = []
    for spec in catalog.models.values():
        schema = PARAMS.get(spec.name)
        live = {q: sum(1 for w in workers if serves(w, q, spec.name)) for q in spec.queues}
        out.append({
            "name": spec.name, "description": spec.description, "input": spec.input,
            "devices": list(spec.devices), "queues": spec.queues, "batch_size": spec.batch_size,
            "gpu_batch_size": spec.gpu_batch_size, "max_batch_size": spec.max_batch_size, "params": spec.params,
            # What `params` may hold, checked at submit (marketplace.tasks.params); None: anything.
            "params_schema": schema.model_json_schema() if schema else None,
            "price": {
                device: {"start_fee": str(p.start_fee), "per_second": str(p.per_second),
                         "per_item": str(p.per_item), "failed": p.failed}
                for device, p in spec.price.items()
            },
            "live_workers": live,
        })
    return out

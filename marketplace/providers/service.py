"""Providers and their nodes: enroll, list, disable, rotate; node authentication; earnings.

A node's credential is handed out once, at enrollment or rotation: the platform keeps the
node's public key and the hash of its secret, and the broker keeps its ACL user.
"""
from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from marketplace.audit import service as audit
from marketplace.catalog import get_catalog
from marketplace.infra.db import utcnow
from marketplace.infra.errors import Conflict, InvalidInput, NotFound, PermissionDenied, Unavailable
from marketplace.providers import broker_acl, keys
from marketplace.providers.models import Node
from marketplace.settings import get_settings
from marketplace.users.models import User

logger = logging.getLogger(__name__)
NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
HOST_SUFFIX = "@node"


def hostname_for(name: str) -> str:
    """A node's hostname in the registry and on its claims."""
    return f"{name}{HOST_SUFFIX}"


def require_provider(user: User) -> None:
    if not (user.provider or user.is_admin):
        raise PermissionDenied("the provider role is required (an operator grants it: marketplace users set EMAIL --provider)")


def _broker() -> redis.Redis:
    return redis.Redis.from_url(get_settings().celery_broker_url, socket_connect_timeout=3, socket_timeout=5)


def _queues(requested: list[str] | None) -> list[str]:
    catalog = get_catalog().queues
    if not requested:
        return list(catalog)
    unknown = [q for q in requested if q not in catalog]
    if unknown:
        raise InvalidInput.field("queues", f"not compute queues: {', '.join(unknown)} (one of {', '.join(catalog)})")
    return sorted(set(requested))


def _credential(node: Node, *, secret: str, private_key: str, broker_user: str, broker_password: str
                ) -> dict[str, Any]:
    settings = get_settings()
    broker = settings.public_broker_url or settings.celery_broker_url
    return {
        "version": 1, "node_id": str(node.id), "name": node.name, "hostname": node.hostname,
        "queues": list(node.queues), "grpc_address": settings.public_grpc_address, "api_url": settings.public_api_url,
        "node_secret": secret, "private_key": private_key, "public_key": node.public_key,
        "broker_url": broker_acl.node_broker_url(broker_url=broker, user=broker_user, password=broker_password),
    }


def _issue(node: Node) -> dict[str, Any]:
    """New secret, key pair and broker user for `node`: the credential, shown once."""
    secret = keys.new_secret()
    private, public = keys.new_keypair()
    node.secret_hash = keys.secret_hash(secret)
    node.public_key = public
    r = _broker()
    broker_acl.declare_queues(list(node.queues))
    try:
        broker_acl.remove_user(r, node_id=node.id)  # a rotation: the old user's connections are closed
        user, password = broker_acl.create_user(r, node_id=node.id, queues=list(node.queues))
    except redis.exceptions.ResponseError as exc:
        if "unknown command" not in str(exc).lower():
            raise
        raise Unavailable("the broker offers no ACL command, which gives each node its own limited broker user: "
                          "enable it (or name its renamed command in MARKETPLACE_BROKER_ACL_COMMAND)") from None
    return _credential(node, secret=secret, private_key=private, broker_user=user, broker_password=password)


def enroll(session: Session, *, provider: User, name: str, queues: list[str] | None = None
           ) -> tuple[Node, dict[str, Any]]:
    """A new node of `provider`: (its row, its credential, shown once)."""
    require_provider(provider)
    name = (name or "").strip()
    if not NAME.match(name):
        raise InvalidInput.field("name", "1-63 characters: lowercase letters, digits and '-', not first")
    if session.scalar(select(Node.id).where(Node.name == name)) is not None:
        raise Conflict(f"a node named {name!r} exists", field="name")
    node = Node(id=uuid.uuid4(), provider_id=provider.id, name=name, hostname=hostname_for(name),
                queues=_queues(queues), public_key="", secret_hash="", enabled=True, created_at=utcnow())
    session.add(node)
    session.flush()
    credential = _issue(node)
    audit.append(session, actor=f"user:{provider.id}", action="node.enrolled", subject=f"node:{node.id}",
                 data={"name": name, "queues": list(node.queues), "public_key": node.public_key})
    return node, credential


def _own_node(session: Session, *, provider: User, name: str) -> Node:
    node = session.scalar(select(Node).where(Node.name == name).with_for_update())
    if node is None or (node.provider_id != provider.id and not provider.is_admin):
        raise NotFound(f"no node named {name!r}", field="name")
    return node


def disable(session: Session, *, provider: User, name: str) -> Node:
    """Refuse the node's calls and parts from now on, remove its broker user, and take it out of
    the registry (GET /v1/workers, the scheduler's live nodes) instead of waiting for its heartbeat
    to expire."""
    from marketplace.infra.after_commit import defer
    from marketplace.infra.redis_client import get_redis
    from marketplace.registry.service import deregister

    node = _own_node(session, provider=provider, name=name)
    if node.enabled:
        node.enabled = False
        node.disabled_at = utcnow()
        broker_acl.remove_user(_broker(), node_id=node.id)
        # Once committed: a heartbeat authenticated before the commit would register it again.
        # One in flight across the commit deregisters itself (`providers.work.heartbeat`).
        defer(session, lambda hostname=node.hostname: deregister(get_redis(), hostname=hostname))
        audit.append(session, actor=f"user:{provider.id}", action="node.disabled", subject=f"node:{node.id}",
                     data={"name": node.name})
    return node


def rotate(session: Session, *, provider: User, name: str) -> tuple[Node, dict[str, Any]]:
    """A new secret, key and broker password; the old ones are refused from now on."""
    node = _own_node(session, provider=provider, name=name)
    if not node.enabled:
        raise Conflict(f"node {name!r} is disabled", field="name")
    credential = _issue(node)
    node.rotated_at = utcnow()
    audit.append(session, actor=f"user:{provider.id}", action="node.rotated", subject=f"node:{node.id}",
                 data={"name": node.name, "public_key": node.public_key})
    return node, credential


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def node_document(node: Node) -> dict[str, Any]:
    return {"id": str(node.id), "name": node.name, "hostname": node.hostname, "queues": list(node.queues),
            "public_key": node.public_key, "enabled": node.enabled, "created_at": _iso(node.created_at),
            "rotated_at": _iso(node.rotated_at), "disabled_at": _iso(node.disabled_at)}


def list_nodes(session: Session, *, provider: User) -> list[dict[str, Any]]:
    """The provider's nodes, each with `online`: its heartbeat is current (as in GET /v1/workers)."""
    from marketplace.infra.redis_client import get_redis
    from marketplace.registry.service import live_workers

    require_provider(provider)
    rows = session.scalars(select(Node).where(Node.provider_id == provider.id).order_by(Node.created_at))
    live = {w.get("hostname") for w in live_workers(get_redis())}
    return [{**node_document(n), "online": n.hostname in live} for n in rows]


@dataclass(frozen=True)
class NodeIdentity:
    """A node whose call carried its id and a matching secret."""

    id: str
    name: str
    hostname: str
    provider_id: str
    queues: tuple[str, ...]
    public_key: str


def authenticate(session: Session, *, node_id: str, secret: str) -> NodeIdentity:
    """The node of a call, or Unauthenticated / PermissionDenied (a disabled node)."""
    from marketplace.infra.errors import Unauthenticated

    try:
        nid = uuid.UUID(str(node_id))
    except ValueError:
        raise Unauthenticated("unknown node or wrong node secret") from None
    node = session.get(Node, nid)
    if node is None or not secret or not keys.secret_matches(secret, node.secret_hash):
        raise Unauthenticated("unknown node or wrong node secret")
    if not node.enabled:
        raise PermissionDenied(f"node {node.name} is disabled")
    return NodeIdentity(id=str(node.id), name=node.name, hostname=node.hostname, provider_id=str(node.provider_id),
                        queues=tuple(node.queues), public_key=node.public_key)


def earnings(session: Session, *, provider: User) -> dict[str, Any]:
    """The provider's earnings: in all, per node and per UTC day."""
    from marketplace.billing.models import LedgerEntry
    from marketplace.billing.money import q

    require_provider(provider)
    day = func.date(func.timezone("UTC", LedgerEntry.created_at))
    rows = session.execute(
        select(Node.name, day, func.sum(LedgerEntry.amount), func.count())
        .join(Node, Node.id == LedgerEntry.node_id)
        .where(LedgerEntry.user_id == provider.id, LedgerEntry.kind == "earning")
        .group_by(Node.name, day).order_by(day, Node.name)
    ).all()
    per_node: dict[str, Any] = {}
    per_day: dict[str, Any] = {}
    total = 0
    entries = []
    for name, d, amount, count in rows:
        entries.append({"node": name, "day": d.isoformat(), "amount": str(q(amount)), "subtasks": count})
        per_node[name] = per_node.get(name, 0) + amount
        per_day[d.isoformat()] = per_day.get(d.isoformat(), 0) + amount
        total += amount
    return {"total": str(q(total or 0)) if rows else "0.000000",
            "by_node": [{"node": k, "amount": str(q(v))} for k, v in sorted(per_node.items())],
            "by_day": [{"day": k, "amount": str(q(v))} for k, v in sorted(per_day.items())],
            "by_node_and_day": entries, "share": str(get_settings().provider_share)}

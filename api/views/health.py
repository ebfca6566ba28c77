"""Liveness and readiness."""
from __future__ import annotations

from flask import Blueprint, jsonify
from sqlalchemy import text

from api.openapi import api_doc
from marketplace.infra.db import get_engine
from marketplace.settings import get_settings

bp = Blueprint("health", __name__)


@bp.get("/healthz")
@api_doc(summary="Liveness", auth=False, responses={200: {"type": "object"}}, tags=["ops"])
def healthz():  # type: ignore[no-untyped-def]
    return jsonify({"status": "ok"})


@bp.get("/readyz")
@api_doc(summary="Readiness: database, Redis and object store (503 if any is down)", auth=False,
         responses={200: {"type": "object"}}, tags=["ops"], description=(
             "With MARKETPLACE_READY_NODES (what `marketplace standalone` sets to its own nodes), also "
             "`nodes`: 503 until each named node is online and has loaded the models it serves."))
def readyz():  # type: ignore[no-untyped-def]
    from marketplace.infra.redis_client import get_redis
    from marketplace.infra.storage import get_store

    checks: dict[str, str] = {}

    def check(name: str, fn) -> None:  # type: ignore[no-untyped-def]
        try:
            fn()
            checks[name] = "ok"
        except Exception as exc:  # readiness reports every failure, it never raises
            checks[name] = f"unavailable: {type(exc).__name__}"

    def _db() -> None:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))

    check("database", _db)
    check("redis", lambda: get_redis().ping())
    check("storage", lambda: get_store().check())
    if wanted := [name.strip() for name in get_settings().ready_nodes.split(",") if name.strip()]:
        checks["nodes"] = _nodes_ready(wanted) if checks["redis"] == "ok" else "unknown: Redis unavailable"
    ready = all(v == "ok" for v in checks.values())
    resp = jsonify({"status": "ready" if ready else "unavailable", "checks": checks})
    resp.status_code = 200 if ready else 503
    if not ready:
        resp.mimetype = "application/problem+json"
    return resp


def _nodes_ready(hostnames: list[str]) -> str:
    """"ok" once every named node heartbeats with none of its models still loading."""
    from marketplace.infra.redis_client import get_redis
    from marketplace.registry.service import LOADING, live_workers

    live = {w.get("hostname"): w for w in live_workers(get_redis())}
    waiting = []
    for hostname in hostnames:
        if hostname not in live:
            waiting.append(f"{hostname} not online")
        elif loading := sorted(m for m, why in (live[hostname].get("unavailable") or {}).items() if why == LOADING):
            waiting.append(f"{hostname} loading {', '.join(loading)}")
    return "ok" if not waiting else "waiting: " + "; ".join(waiting)

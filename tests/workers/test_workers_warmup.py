"""Warm nodes: a node announces a model that loads weights only once its pool has loaded it (and
run one inference), and refuses, saying why, a model it cannot load."""
from __future__ import annotations

import json
import time

import pytest

from tests.support.api import register
from tests.support.wait import wait_until

LOADING = "still loading the model (warm-up)"  # registry.service.LOADING, written out


@pytest.fixture()
def user(client):  # type: ignore[no-untyped-def]
    return register(client)


@pytest.fixture()
def admin(client):  # type: ignore[no-untyped-def]
    from tests.support.accounts import make_admin

    return make_admin(client)


def _listed(client, viewer, hostname: str) -> dict | None:  # type: ignore[no-untyped-def]
    resp = client.get("/v1/workers", headers=viewer["headers"])
    assert resp.status_code == 200, resp.get_json()
    return next((w for w in resp.get_json()["workers"] if w["hostname"] == hostname), None)


def _record(redis_client, node) -> dict:  # type: ignore[no-untyped-def]
    raw = redis_client.get(f"marketplace:worker:{node.hostname}")
    return json.loads(raw) if raw else {}


def _readyz(client, monkeypatch, nodes: str) -> tuple[int, dict]:  # type: ignore[no-untyped-def]
    """/readyz with MARKETPLACE_READY_NODES=nodes (what the standalone sets for its API)."""
    from marketplace.settings import reset_settings

    monkeypatch.setenv("MARKETPLACE_READY_NODES", nodes)
    reset_settings()
    try:
        resp = client.get("/readyz")
        return resp.status_code, resp.get_json()
    finally:
        monkeypatch.delenv("MARKETPLACE_READY_NODES")
        reset_settings()


def test_embedding_node_announces_the_model_only_after_every_pool_process_loaded_it(  # type: ignore[no-untyped-def]
    client, user, nodes, redis_client, monkeypatch,
):
    from marketplace.registry.service import serves

    node = nodes(["cpu.embedding"], concurrency=2)
    node.wait_ready(redis_client, loaded=False)  # its first heartbeat: the test watches the loading
    # Online at once (its heartbeat is there), the model not yet: importing torch alone takes seconds.
    first = _record(redis_client, node)
    assert first["unavailable"] == {"embedding": LOADING}, first
    assert not serves(first, "cpu.embedding", "embedding")  # the scheduler counts none of its slots
    doc = _listed(client, user, node.hostname)
    assert doc["status"] == "online" and doc["unavailable"] == {"embedding": LOADING}  # users see it as is
    # A readiness check that names the node waits for it (the standalone's, for its own nodes).
    status, body = _readyz(client, monkeypatch, node.hostname)
    assert status == 503 and body["checks"]["nodes"] == f"waiting: {node.hostname} loading embedding", body
    status, body = _readyz(client, monkeypatch, "nobody@nowhere")
    assert status == 503 and body["checks"]["nodes"] == "waiting: nobody@nowhere not online", body

    # Each record seen while waiting: the model shows up only with both pool processes warmed.
    seen: list[dict] = []

    def announced() -> bool:
        seen.append(_record(redis_client, node))
        return seen[-1].get("unavailable") == {}

    wait_until(announced, 180, lambda: f"embedding announced; last record {seen[-1]}", interval=0.05)
    log = node.tail(400)
    assert log.count("warm-up: embedding on cpu ready") == 2, log
    assert "now runs 'embedding' (loaded)" in log
    assert all(r["unavailable"] == {"embedding": LOADING} for r in seen[:-1])
    assert serves(seen[-1], "cpu.embedding", "embedding") and seen[-1]["concurrency"] == 2
    assert _listed(client, user, node.hostname)["unavailable"] == {}
    status, body = _readyz(client, monkeypatch, node.hostname)
    assert status == 200 and body["checks"]["nodes"] == "ok", body
    assert "nodes" not in client.get("/readyz").get_json()["checks"]  # not asked for: not checked


@pytest.mark.parametrize("broken", ["missing", "bad-config"])
def test_node_that_cannot_load_embedding_refuses_it_and_says_why(  # type: ignore[no-untyped-def]
    client, user, admin, nodes, redis_client, tmp_path, broken,
):
    from marketplace.registry.service import serves

    if broken == "missing":
        path, why = tmp_path / "no-such-model", f"no model directory at {tmp_path / 'no-such-model'}"
    else:  # a directory sentence-transformers cannot read
        path = tmp_path / "model"
        path.mkdir()
        (path / "config.json").write_text("{ this is not json")
        (path / "modules.json").write_text("[{]")
        why = "could not load it on cpu"
    node = nodes(["cpu.embedding"], concurrency=1, env={"MARKETPLACE_EMBEDDING_MODEL_PATH": str(path)})
    node.wait_ready(redis_client, loaded=False)  # its first heartbeat: the test watches the loading
    started = time.monotonic()

    def refused() -> str | None:
        reason = (_listed(client, admin, node.hostname) or {}).get("unavailable", {}).get("embedding")
        return reason if reason and reason != LOADING else None

    reason = wait_until(refused, 120, "the node to give up loading embedding")
    assert why in reason and "could not load it on cpu" in reason, reason
    assert time.monotonic() - started < 120
    assert _listed(client, user, node.hostname)["unavailable"] == {"embedding": "not run on this node"}
    assert not serves(_record(redis_client, node), "cpu.embedding", "embedding")
    assert "will NOT run 'embedding'" in node.tail(400)

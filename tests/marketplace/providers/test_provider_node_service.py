"""The platform's NodeService against the real gRPC server, PostgreSQL and Redis: what a node's
credential lets it do, and the parts it refuses (another node's run, unsigned, forged, disabled)."""
from __future__ import annotations

import hashlib
import json
import threading
import time
from typing import Any

import grpc
import pytest
import redis

from tests.marketplace.providers.conftest import enroll, make_provider
from tests.support.api import register


class Node:
    """A node as the platform sees it: its credential's NodeService calls, made from this test."""

    def __init__(self, target: str, credential: dict[str, Any]) -> None:
        from marketplace.pb.worker import worker_pb2_grpc

        self.credential = credential
        self.channel = grpc.insecure_channel(target)
        self.stub = worker_pb2_grpc.NodeServiceStub(self.channel)

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return (("x-node-id", self.credential["node_id"]), ("x-node-secret", self.credential["node_secret"]))

    def beat(self, queues: list[str], models: list[str]) -> None:
        from marketplace.pb.worker import worker_pb2

        info = {"queues": queues, "models": models, "concurrency": 1, "incarnation": "test", "running": 0}
        self.stub.Heartbeat(worker_pb2.NodeHeartbeatRequest(info_json=json.dumps(info)), metadata=self.md)

    def claim(self, subtask_id: str) -> Any:
        from marketplace.pb.worker import worker_pb2

        return self.stub.ClaimSubtask(worker_pb2.ClaimSubtaskRequest(subtask_id=subtask_id, message_id="m",
                                                                     incarnation="test"), metadata=self.md)

    def complete(self, subtask_id: str, attempt: int, output: bytes, *, key: str | None = "own",
                 signature: str | None = None) -> Any:
        from marketplace.pb.worker import worker_pb2
        from marketplace.providers.keys import sign_part

        sha = hashlib.sha256(output).hexdigest()
        if signature is None and key is not None:
            signature = sign_part(self.credential["private_key"] if key == "own" else key, subtask_id=subtask_id,
                                  attempt=attempt, sha256=sha)
        return self.stub.CompleteSubtask(worker_pb2.CompleteSubtaskRequest(
            subtask_id=subtask_id, attempt=attempt, output=output, sha256=sha, signature=signature or "",
            seconds=0.5), metadata=self.md)


def _subtasks(task_id: str) -> list[Any]:
    from sqlalchemy import text

    from marketplace.infra.db import get_engine

    with get_engine().connect() as conn:
        return conn.execute(text("SELECT id::text, index, status, worker, attempts, dispatches, error "
                                 "FROM subtasks WHERE task_id = :t ORDER BY index"), {"t": task_id}).all()


def _refusal(call):  # type: ignore[no-untyped-def]
    try:
        call()
    except grpc.RpcError as exc:
        return exc
    return None


def _wait(predicate, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


@pytest.fixture()
def embedding_nodes(control_plane, app):  # type: ignore[no-untyped-def]
    """Three enrolled nodes on cpu.embedding, heartbeating over NodeService; no process consumes
    the queue, so each claim here is the test's."""
    client = app.test_client()
    provider = make_provider(client)
    nodes = [Node(control_plane["grpc"], enroll(client, provider, queues=["cpu.embedding"])["credential"])
             for _ in range(3)]
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            for n in nodes:
                try:
                    n.beat(["cpu.embedding"], ["embedding"])
                except grpc.RpcError:
                    pass  # a disabled one
            stop.wait(0.5)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield {"nodes": nodes, "provider": provider, "client": client}
    finally:
        stop.set()
        thread.join(timeout=5)


def test_only_the_holder_signing_with_its_own_key_completes_a_subtask(embedding_nodes):
    from marketplace.results.service import encode_part

    client = embedding_nodes["client"]
    a, b, c = embedding_nodes["nodes"]
    buyer = register(client)
    resp = client.post("/v1/tasks", json={"model": "embedding", "inputs": ["x", "y"], "device": "cpu",
                                          "batch_size": 1}, headers=buyer["headers"])
    assert resp.status_code == 202, resp.get_json()
    task_id = resp.get_json()["id"]
    rows = _wait(lambda: (r := _subtasks(task_id)) and all(x.dispatches > 0 for x in r) and r)
    first = rows[0].id
    part = encode_part([[0.5, 0.25]])

    claimed = b.claim(first)
    assert claimed.run, claimed
    work = json.loads(claimed.work_json)
    assert (work["subtask_id"], work["attempts"], work["inputs"]) == (first, 1, ["x"])

    # Another node cannot complete it, even signing with its own enrolled key.
    with pytest.raises(grpc.RpcError) as err:
        a.complete(first, 1, part)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "not held by node" in err.value.details()
    assert _subtasks(task_id)[0].status == "Running" and _subtasks(task_id)[0].worker == b.credential["hostname"]

    # Its holder, signing with another node's key: refused; the run goes back and is sent again.
    with pytest.raises(grpc.RpcError) as err:
        b.complete(first, 1, part, key=a.credential["private_key"])
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "signature" in err.value.details()
    row = _subtasks(task_id)[0]
    assert row.status == "Pending" and "refused" in row.error and row.dispatches == 2, row
    with pytest.raises(grpc.RpcError) as err:  # not given to the node whose part was refused: its message goes back
        b.claim(first)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "runs elsewhere" in err.value.details()

    # Another node runs it; unsigned is refused as well, then its signed part completes it.
    assert c.claim(first).run
    with pytest.raises(grpc.RpcError) as err:
        c.complete(first, 2, part, key=None)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "unsigned" in err.value.details()
    assert a.claim(first).run
    done = json.loads(a.complete(first, 3, part).outcome_json)
    assert done["ok"] is True and done["sha256"] == hashlib.sha256(part).hexdigest()
    assert _subtasks(task_id)[0].status == "Done"

    from sqlalchemy import text

    from marketplace.infra.db import get_engine

    # The audit log keeps the refusals with the node that sent them.
    with get_engine().connect() as conn:
        refused = conn.execute(text(
            "SELECT actor, data FROM audit_pending WHERE action = 'subtask.part_refused' AND subject = :s "
            "UNION ALL SELECT actor, data FROM audit_records WHERE action = 'subtask.part_refused' AND subject = :s"),
            {"s": f"subtask:{first}"}).all()
    assert sorted(a for a, _ in refused) == sorted([f"node:{b.credential['name']}", f"node:{c.credential['name']}"])


def test_disable_and_rotate_refuse_the_old_credential(embedding_nodes, control_plane):
    client, provider = embedding_nodes["client"], embedding_nodes["provider"]
    a, b, _ = embedding_nodes["nodes"]

    resp = client.post(f"/v1/providers/nodes/{a.credential['name']}/disable", headers=provider["headers"])
    assert resp.status_code == 200 and resp.get_json()["enabled"] is False
    # Refused within the platform's cache of node identities (rpc.nodes.AUTH_CACHE_S).
    error = _wait(lambda: _refusal(lambda: a.beat(["cpu.embedding"], ["embedding"])), timeout=10)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "disabled" in error.details()
    with pytest.raises(grpc.RpcError) as err:  # its parts too
        a.complete(str(__import__("uuid").uuid4()), 1, b"[]")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "disabled" in err.value.details()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(a.credential["broker_url"]).ping()

    resp = client.post(f"/v1/providers/nodes/{b.credential['name']}/rotate", headers=provider["headers"])
    assert resp.status_code == 200
    fresh = resp.get_json()["credential"]
    assert fresh["node_id"] == b.credential["node_id"] and fresh["node_secret"] != b.credential["node_secret"]
    error = _wait(lambda: _refusal(lambda: b.beat(["cpu.embedding"], ["embedding"])), timeout=10)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(b.credential["broker_url"]).ping()
    assert redis.Redis.from_url(fresh["broker_url"]).ping()
    b.credential = fresh
    b.beat(["cpu.embedding"], ["embedding"])

    listed = client.get("/v1/providers/nodes", headers=provider["headers"]).get_json()["nodes"]
    by_name = {n["name"]: n for n in listed}
    assert by_name[a.credential["name"]]["enabled"] is False and by_name[b.credential["name"]]["rotated_at"]
    # b has just beaten with its fresh credential; a is disabled (its heartbeat dropped)
    assert by_name[b.credential["name"]]["online"] is True and by_name[a.credential["name"]]["online"] is False
    assert "node_secret" not in json.dumps(listed) and "private_key" not in json.dumps(listed)
    # The same listing over gRPC (WorkerService.ListNodes), with the provider's token.
    from marketplace.pb.worker import worker_pb2, worker_pb2_grpc

    with grpc.insecure_channel(control_plane["grpc"]) as channel:
        nodes = worker_pb2_grpc.WorkerServiceStub(channel).ListNodes(
            worker_pb2.ListNodesRequest(), metadata=(("authorization", provider["headers"]["Authorization"]),)).nodes
    over_grpc = {n.name: (n.enabled, n.online) for n in nodes}
    assert over_grpc[a.credential["name"]] == (False, False) and over_grpc[b.credential["name"]] == (True, True)


def test_enrollment_needs_the_provider_role_and_a_valid_name(control_plane, app):
    client = app.test_client()
    user = register(client)
    resp = client.post("/v1/providers/nodes", json={"name": "mine"}, headers=user["headers"])
    assert resp.status_code == 403, resp.get_json()
    provider = make_provider(client)
    resp = client.post("/v1/providers/nodes", json={"name": "Not A Name!"}, headers=provider["headers"])
    assert resp.status_code == 422 and resp.get_json()["errors"][0]["field"] == "name", resp.get_json()
    resp = client.post("/v1/providers/nodes", json={"name": "okname", "queues": ["marketplace.scheduler"]},
                       headers=provider["headers"])
    assert resp.status_code == 422 and resp.get_json()["errors"][0]["field"] == "queues", resp.get_json()
    first = enroll(client, provider)
    resp = client.post("/v1/providers/nodes", json={"name": first["node"]["name"]}, headers=provider["headers"])
    assert resp.status_code == 409, resp.get_json()
    spec = client.get("/openapi.json").get_json()
    for path in ("/v1/providers/nodes", "/v1/providers/nodes/{name}/disable", "/v1/providers/nodes/{name}/rotate",
                 "/v1/providers/earnings"):
        assert path in spec["paths"], sorted(spec["paths"])


def test_a_run_killed_at_its_hard_limit_is_reported_by_its_node_and_sent_again(embedding_nodes, monkeypatch):
    """The node cannot send the `lost_run` errback (the scheduler's queue): its result backend
    reports the lost run to NodeService, which retries it as `lost_run` does; only for its own run."""
    from types import SimpleNamespace

    from marketplace.infra import names
    from marketplace.pb.worker import worker_pb2
    from workers import backends

    client = embedding_nodes["client"]
    a, b, _ = embedding_nodes["nodes"]
    buyer = register(client)
    resp = client.post("/v1/tasks", json={"model": "embedding", "inputs": ["x"], "device": "cpu"},
                       headers=buyer["headers"])
    task_id = resp.get_json()["id"]
    [row] = _wait(lambda: (r := _subtasks(task_id)) and all(x.dispatches > 0 for x in r) and r)
    message_id = f"{row.id}:{row.dispatches}"
    from marketplace.pb.worker import worker_pb2 as pb

    assert b.stub.ClaimSubtask(pb.ClaimSubtaskRequest(subtask_id=row.id, message_id=message_id, incarnation="t"),
                               metadata=b.md).run

    with pytest.raises(grpc.RpcError) as err:  # another node cannot have it re-sent
        a.stub.FailSubtask(worker_pb2.FailSubtaskRequest(kind="lost", message_id=message_id, subtask_id=row.id),
                           metadata=a.md)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

    monkeypatch.setattr(backends, "_credential", lambda: b.credential)
    from marketplace.infra.celery_app import app as celery_app

    backend = backends.NodeResultBackend(app=celery_app)
    backend._call_task_errbacks(SimpleNamespace(errbacks=[{"task": names.LOST_RUN, "args": []}], id=message_id),
                                TimeoutError("hard time limit"), None)
    after = _subtasks(task_id)[0]
    assert after.status == "Pending" and "hard time limit" in after.error and after.dispatches == row.dispatches + 1

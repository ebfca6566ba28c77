"""Provider nodes end to end: a node started from its credential alone runs echo and generic jobs,
holds none of the platform's secrets, is refused once disabled; a forged part is refused and its
subtask still ends Done on another node, charged once; earnings are the provider share."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

from tests.marketplace.providers.conftest import NodeProcess, enroll, make_provider, write_credential
from tests.support.api import register, wait_for_task
from tests.support.servers import ROOT

SECRETS = ("MARKETPLACE_DATABASE_URL", "MARKETPLACE_REDIS_URL", "MARKETPLACE_BROKER_URL", "MARKETPLACE_JWT_SECRET",
           "MARKETPLACE_AUDIT_SIGNING_KEY", "MARKETPLACE_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
DOUBLE = ["/usr/bin/python3", "-c",
          "import sys, json\nfor line in sys.stdin:\n    print(json.dumps(json.loads(line) * 2), flush=True)"]
# The price card (config/models.yaml), echo on cpu: start fee, per second, per item.
ECHO_START, ECHO_SECOND, ECHO_ITEM = Decimal("0.0001"), Decimal("0.0001"), Decimal("0.000001")
CENT = Decimal("0.000001")


def _q(x: Decimal) -> Decimal:
    return x.quantize(CENT, rounding=ROUND_HALF_UP)


@pytest.fixture(scope="module")
def provider_node(control_plane, app):  # type: ignore[no-untyped-def]
    client = app.test_client()
    provider = make_provider(client)
    doc = enroll(client, provider, queues=["cpu.generic"])
    node = NodeProcess(write_credential(doc["credential"]))
    try:
        node.wait_ready()
        yield {"provider": provider, "node": node, "doc": doc}
    finally:
        node.stop()


def _submit(client, user, model, inputs, **params):  # type: ignore[no-untyped-def]
    resp = client.post("/v1/tasks", json={"model": model, "inputs": inputs, "device": "cpu",
                                          **({"params": params} if params else {}),
                                          **({"batch_size": 1} if model == "echo" else {})},
                       headers=user["headers"])
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()["id"]


def test_a_node_from_its_credential_alone_runs_echo_and_generic(control_plane, provider_node, app):
    client = app.test_client()
    node = provider_node["node"]
    env = node.environ()
    assert not [k for k in SECRETS if k in env], sorted(k for k in env if k.startswith(("MARKETPLACE_", "AWS_")))
    assert env["MARKETPLACE_NODE_CREDENTIALS"].endswith("node.json")

    buyer = register(client)
    echo = wait_for_task(client, buyer["headers"], _submit(client, buyer, "echo", ["a", "b", "c"]), timeout=120)
    assert echo["status"] == "Done", (echo, node.tail())
    assert client.get(f"/v1/tasks/{echo['id']}/result", headers=buyer["headers"]).get_json()["outputs"] == ["a", "b", "c"]
    subtasks = client.get(f"/v1/tasks/{echo['id']}/subtasks", headers=buyer["headers"]).get_json()["subtasks"]
    assert {s["status"] for s in subtasks} == {"Done"} and len(subtasks) == 3

    generic = wait_for_task(client, buyer["headers"], _submit(client, buyer, "generic", [1, "ab"], command=DOUBLE),
                            timeout=120)
    assert generic["status"] == "Done", (generic, node.tail())
    assert client.get(f"/v1/tasks/{generic['id']}/result",
                      headers=buyer["headers"]).get_json()["outputs"] == [2, "abab"]

    # Every part was run by the provider's node, and its completion record names the node and its signature.
    from sqlalchemy import text

    from marketplace.infra.db import get_engine

    with get_engine().connect() as conn:
        workers = conn.execute(text("SELECT DISTINCT worker FROM subtasks WHERE task_id = ANY(:ids)"),
                               {"ids": [uuid.UUID(echo["id"]), uuid.UUID(generic["id"])]}).scalars().all()
        assert workers == [node.hostname]
        records = conn.execute(text(
            "SELECT actor, data FROM audit_pending WHERE action = 'subtask.finished' AND task_id = :t "
            "UNION ALL SELECT actor, data FROM audit_records WHERE action = 'subtask.finished' AND task_id = :t"),
            {"t": echo["id"]}).all()
    assert len(records) == 3, records
    for actor, data in records:
        data = data if isinstance(data, dict) else json.loads(data)
        assert actor == f"worker:{node.hostname}"
        assert data["node_id"] == provider_node["doc"]["node"]["id"] and data["signature"] and data["attempt"] == 1

    # GET /v1/workers names the node's provider.
    workers_doc = client.get("/v1/workers", headers=buyer["headers"]).get_json()["workers"]
    [mine] = [w for w in workers_doc if w["hostname"] == node.hostname]
    assert mine["provider"] == provider_node["provider"]["id"] and mine["node"] == provider_node["doc"]["node"]["name"]
    import grpc

    from marketplace.pb.worker import worker_pb2, worker_pb2_grpc

    with grpc.insecure_channel(control_plane["grpc"]) as channel:
        listed = worker_pb2_grpc.WorkerServiceStub(channel).ListWorkers(
            worker_pb2.ListWorkersRequest(status="online"),
            metadata=(("authorization", f"Bearer {buyer['tokens']['access_token']}"),))
    [seen] = [w for w in listed.workers if w.hostname == node.hostname]
    assert (seen.provider, seen.node) == (provider_node["provider"]["id"], provider_node["doc"]["node"]["name"])


def test_the_credential_reaches_no_database_and_no_control_queue(control_plane, provider_node, app):
    """With the node's environment (as `marketplace worker --credentials` builds it), PostgreSQL
    cannot be reached; with its broker user, Redis refuses the control queues and everyone else's keys."""
    import redis

    from marketplace.cli.nodes import node_environment

    node = provider_node["node"]
    from marketplace.settings import get_settings

    settings = get_settings()
    held = json.dumps(node.credential)
    for secret in (settings.database_url, settings.jwt_secret.get_secret_value(), settings.redis_url,
                   settings.s3_endpoint_url or "", "marketplace-test"):
        assert secret and secret not in held, secret
    assert set(node.credential) == {"version", "node_id", "name", "hostname", "queues", "grpc_address", "api_url",
                                    "node_secret", "private_key", "public_key", "broker_url"}
    env = node_environment(dict(__import__("os").environ), str(Path(node.proc.args[3])))
    probe = subprocess.run(
        [sys.executable, "-c", "from marketplace.infra.db import get_engine\nget_engine().connect()"],
        env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "a credentialed node has no database" in probe.stderr, probe.stderr[-2000:]

    r = redis.Redis.from_url(node.credential["broker_url"])
    assert r.ping()
    other = enroll(app.test_client(), provider_node["provider"], queues=["cpu.generic"])["node"]["id"]
    for denied in (
        lambda: r.lpush("marketplace.scheduler", "x"),  # a control queue
        lambda: r.lpush("marketplace.results", "x"),
        lambda: r.lpush("cpu.embedding", "x"),  # a compute queue not its own
        lambda: r.get(f"marketplace:worker:{node.hostname}"),  # the registry
        lambda: r.keys("*"),
        # Key patterns, with commands the node may use (kombu's): the platform's own in-flight
        # messages, another node's (same queue, same provider).
        lambda: r.hget("unacked", "x"),
        lambda: r.hget(f"node:{other}:unacked", "x"),
        lambda: r.zrange(f"node:{other}:unacked_index", 0, -1),
        lambda: r.publish("/0.celery.pidbox", "x"),
        lambda: r.sadd("_kombu.binding.cpu.generic", "x"),  # route the platform's publishes elsewhere
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            denied()
    with pytest.raises(redis.exceptions.ResponseError, match="can't access"):  # nor from a script
        r.eval("return redis.call('LPUSH', 'marketplace.scheduler', 'x')", 0)
    assert r.llen("cpu.generic") >= 0  # its own queue
    from marketplace.infra.redis_client import get_redis
    from marketplace.providers.broker_acl import server_major

    if server_major(get_redis()) >= 7:  # its queue's binding table is read-only to it (6.2 has no such selector)
        assert r.smembers("_kombu.binding.cpu.generic")
        with pytest.raises(redis.exceptions.NoPermissionError):
            r.delete("_kombu.binding.cpu.generic")
    assert r.hget(f"node:{node.credential['node_id']}:unacked", "x") is None  # its own in-flight messages
    assert r.get(f"node:{node.credential['node_id']}:unacked_mutex") is None


@pytest.mark.slow
def test_a_credentialed_node_runs_an_embedding_job(control_plane, app):
    client = app.test_client()
    provider = make_provider(client)
    doc = enroll(client, provider, queues=["cpu.embedding"])
    node = NodeProcess(write_credential(doc["credential"]), queues="cpu.embedding", concurrency=1)
    try:
        node.wait_ready()
        buyer = register(client)
        sentences = ["A man is playing a guitar.", "Someone is strumming a guitar.", "The stock market fell."]
        task_id = _submit(client, buyer, "embedding", sentences)
        try:
            task = wait_for_task(client, buyer["headers"], task_id, timeout=150)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{node.tail()}") from None
        assert task["status"] == "Done", (task, node.tail())
        outputs = client.get(f"/v1/tasks/{task['id']}/result", headers=buyer["headers"]).get_json()["outputs"]
        assert [len(v) for v in outputs] == [384, 384, 384]
    finally:
        node.stop()


def _wait_for(predicate, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


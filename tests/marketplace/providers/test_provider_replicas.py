"""Verified results on credentialed nodes: a job's replicas go to nodes of distinct providers.

Two nodes of provider A and one of provider B, all started from their credentials alone (no
operator's node takes these subtasks): every batch of a redundancy-2 job runs once on A's nodes
and once on B's, though A's two nodes take messages twice as fast as B's one.
"""
from __future__ import annotations

from tests.marketplace.providers.conftest import NodeProcess, enroll, make_provider, write_credential
from tests.support.api import register, wait_for_task


def test_replicas_run_on_nodes_of_two_providers(control_plane, app):  # type: ignore[no-untyped-def]
    client = app.test_client()
    a, b = make_provider(client), make_provider(client)
    started = [NodeProcess(write_credential(enroll(client, who, queues=["cpu.generic"])["credential"]), concurrency=1)
               for who in (a, a, b)]
    try:
        for node in started:
            node.wait_ready()
        a1, a2, b1 = started
        buyer = register(client)
        resp = client.post("/v1/tasks", json={"model": "echo", "inputs": [f"v{i}" for i in range(6)], "batch_size": 1,
                                              "device": "cpu", "redundancy": 2}, headers=buyer["headers"])
        assert resp.status_code == 202, resp.get_json()
        doc = wait_for_task(client, buyer["headers"], resp.get_json()["id"], timeout=180)
        assert doc["status"] == "Done", (doc, b1.tail())
        outputs = client.get(f"/v1/tasks/{doc['id']}/result", headers=buyer["headers"]).get_json()["outputs"]
        assert outputs == ["v0", "v1", "v2", "v3", "v4", "v5"]
        subs = client.get(f"/v1/tasks/{doc['id']}/subtasks", headers=buyer["headers"]).get_json()["subtasks"]
        assert len(subs) == 6
        for sub in subs:
            by_provider = {r["provider"]: r["node"] for r in sub["replicas"]}
            assert set(by_provider) == {a["id"], b["id"]}, sub
            assert by_provider[a["id"]] in (a1.hostname, a2.hostname) and by_provider[b["id"]] == b1.hostname, sub
            assert [r["agreed"] for r in sub["replicas"]] == [True, True]
    finally:
        for node in started:
            node.stop()

"""A forged part is refused and its subtask still ends Done on another node, charged once; the
honest node's provider earns MARKETPLACE_PROVIDER_SHARE of each charge (real node processes)."""
from __future__ import annotations

import uuid
from decimal import Decimal

from tests.marketplace.providers.conftest import NodeProcess, enroll, make_provider, write_credential
from tests.marketplace.providers.test_provider_nodes_e2e import (
    ECHO_ITEM,
    ECHO_SECOND,
    ECHO_START,
    _q,
    _submit,
    _wait_for,
)
from tests.support.api import register, wait_for_task


def _audit(action: str, task_id: str) -> list:  # type: ignore[type-arg]
    from sqlalchemy import text

    from marketplace.infra.db import get_engine

    with get_engine().connect() as conn:
        return conn.execute(text(
            "SELECT actor, data FROM audit_pending WHERE action = :a AND task_id = :t "
            "UNION ALL SELECT actor, data FROM audit_records WHERE action = :a AND task_id = :t"),
            {"a": action, "t": task_id}).all()


def test_a_forged_part_is_refused_and_its_subtask_ends_done_on_another_node_charged_once(control_plane, app):
    """A node whose credential signs with a key the platform never enrolled (a forger) has each part
    refused; its subtasks run again on an honest node; each is charged once, and only the honest
    node's provider earns: MARKETPLACE_PROVIDER_SHARE (0.8) of each charge, to the millionth."""
    from marketplace.providers.keys import new_keypair

    client = app.test_client()
    honest_provider, forging_provider = make_provider(client), make_provider(client)
    honest = enroll(client, honest_provider, queues=["cpu.generic"])
    forged = enroll(client, forging_provider, queues=["cpu.generic"])
    forged["credential"]["private_key"] = new_keypair()[0]
    forger = NodeProcess(write_credential(forged["credential"]), concurrency=2)
    good = None
    try:
        forger.wait_ready()
        buyer = register(client)
        task_id = _submit(client, buyer, "echo", ["a", "b", "c", "d"])
        refused = _wait_for(lambda: _audit("subtask.part_refused", task_id), timeout=90)
        assert refused[0][0] == f"node:{forged['node']['name']}"
        good = NodeProcess(write_credential(honest["credential"]), concurrency=2)
        good.wait_ready()
        doc = wait_for_task(client, buyer["headers"], task_id, timeout=180)
        assert doc["status"] == "Done", (doc, good.tail(), forger.tail())
        assert client.get(f"/v1/tasks/{task_id}/result", headers=buyer["headers"]).get_json()["outputs"] == \
            ["a", "b", "c", "d"]
    finally:
        forger.stop()
        if good is not None:
            good.stop()

    from sqlalchemy import text

    from marketplace.infra.db import get_engine

    with get_engine().connect() as conn:
        subtasks = conn.execute(text("SELECT id, worker, seconds, items FROM subtasks WHERE task_id = :t"),
                                {"t": uuid.UUID(task_id)}).all()
        entries = conn.execute(text("SELECT subtask_id, kind, amount, user_id, node_id FROM ledger_entries "
                                    "WHERE task_id = :t ORDER BY subtask_id, kind"), {"t": uuid.UUID(task_id)}).all()
    assert {s.worker for s in subtasks} == {honest["credential"]["hostname"]}
    charges = {e.subtask_id: -e.amount for e in entries if e.kind == "charge"}
    earnings = {e.subtask_id: e for e in entries if e.kind == "earning"}
    assert len([e for e in entries if e.kind == "charge"]) == 4 == len(charges)  # charged once each
    assert not [e for e in entries if e.kind not in ("charge", "earning")]
    for s in subtasks:
        # The price card by hand: start fee + seconds x per second + items x per item.
        expected = _q(ECHO_START + Decimal(str(round(s.seconds, 6))) * ECHO_SECOND + s.items * ECHO_ITEM)
        assert charges[s.id] == expected
        earning = earnings[s.id]
        assert earning.amount == _q(expected * Decimal("0.8"))
        assert (str(earning.user_id), str(earning.node_id)) == (honest_provider["id"], honest["node"]["id"])
    total_charged = sum(charges.values())
    total_earned = sum(e.amount for e in earnings.values())
    platform = total_charged - total_earned
    assert total_charged == total_earned + platform and platform == sum(
        charges[s] - earnings[s].amount for s in charges)

    # The provider sees them: per node and day over REST, in its ledger over gRPC, in its balance.
    report = client.get("/v1/providers/earnings", headers=honest_provider["headers"]).get_json()
    assert Decimal(report["total"]) == total_earned and report["share"] == "0.8"
    assert report["by_node"] == [{"node": honest["node"]["name"], "amount": str(total_earned)}]
    assert report["by_node_and_day"][0]["subtasks"] == 4
    nothing = client.get("/v1/providers/earnings", headers=forging_provider["headers"]).get_json()
    assert Decimal(nothing["total"]) == 0 and nothing["by_node"] == []

    import grpc

    from marketplace.pb.billing import billing_pb2, billing_pb2_grpc

    with grpc.insecure_channel(control_plane["grpc"]) as channel:
        ledger = billing_pb2_grpc.BillingServiceStub(channel).GetLedger(
            billing_pb2.GetLedgerRequest(task_id=task_id),
            metadata=(("authorization", f"Bearer {honest_provider['tokens']['access_token']}"),))
    assert sorted(e.kind for e in ledger.entries) == ["earning"] * 4
    assert sum(Decimal(e.amount) for e in ledger.entries) == total_earned

    from tests.support.accounts import balance_of

    _wait_for(lambda: balance_of(honest_provider["id"]) == Decimal("100") + total_earned)
    assert balance_of(forging_provider["id"]) == Decimal("100")
    assert balance_of(buyer["id"]) == Decimal("100") - total_charged

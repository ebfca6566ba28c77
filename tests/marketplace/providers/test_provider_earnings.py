"""Earnings over a job of 1,000 subtasks run by a provider's node: one earning per charge, each the
provider share of it to the millionth, and charges = earnings + the platform's revenue."""
from __future__ import annotations

import time
import uuid
from decimal import Decimal

from tests.marketplace.providers.conftest import NodeProcess, enroll, make_provider, write_credential
from tests.marketplace.providers.test_provider_nodes_e2e import ECHO_ITEM, ECHO_SECOND, ECHO_START, _q
from tests.support.accounts import balance_of, set_user
from tests.support.api import register, wait_for_task

N = 1000


def test_earnings_of_a_thousand_subtasks_are_the_provider_share_of_their_charges(control_plane, app):
    client = app.test_client()
    provider = make_provider(client)
    doc = enroll(client, provider, queues=["cpu.generic"])
    node = NodeProcess(write_credential(doc["credential"]), concurrency=2)
    try:
        node.wait_ready()
        buyer = register(client)
        set_user(buyer["id"], max_items_per_task=N)
        started = time.monotonic()
        resp = client.post("/v1/tasks", json={"model": "echo", "inputs": list(range(N)), "batch_size": 1,
                                              "device": "cpu"}, headers=buyer["headers"])
        assert resp.status_code == 202, resp.get_json()
        task = wait_for_task(client, buyer["headers"], resp.get_json()["id"], timeout=600)
        elapsed = time.monotonic() - started
        assert task["status"] == "Done", (task, node.tail())
    finally:
        node.stop()
    print(f"{N} subtasks on one credentialed node (-c 2): {elapsed:.1f}s")

    from sqlalchemy import text

    from marketplace.infra.db import get_engine

    with get_engine().connect() as conn:
        subtasks = {r.id: r for r in conn.execute(text(
            "SELECT id, seconds, items, worker FROM subtasks WHERE task_id = :t"), {"t": uuid.UUID(task["id"])})}
        rows = conn.execute(text("SELECT subtask_id, kind, amount, node_id FROM ledger_entries WHERE task_id = :t"),
                            {"t": uuid.UUID(task["id"])}).all()
    charges = {r.subtask_id: -r.amount for r in rows if r.kind == "charge"}
    earnings = {r.subtask_id: r.amount for r in rows if r.kind == "earning"}
    assert len(subtasks) == len(charges) == len(earnings) == N
    assert {s.worker for s in subtasks.values()} == {doc["credential"]["hostname"]}
    assert {r.node_id for r in rows if r.kind == "earning"} == {uuid.UUID(doc["node"]["id"])}
    for sid, s in subtasks.items():
        expected = _q(ECHO_START + Decimal(str(round(s.seconds, 6))) * ECHO_SECOND + s.items * ECHO_ITEM)
        assert charges[sid] == expected
        assert earnings[sid] == _q(expected * Decimal("0.8"))
    charged, earned = sum(charges.values()), sum(earnings.values())
    revenue = sum(charges[s] - earnings[s] for s in charges)
    assert charged == earned + revenue and Decimal(task["cost"]) == charged
    deadline = time.monotonic() + 30
    while balance_of(provider["id"]) != Decimal("100") + earned and time.monotonic() < deadline:
        time.sleep(0.1)
    assert balance_of(provider["id"]) == Decimal("100") + earned
    assert balance_of(buyer["id"]) == Decimal("100") - charged

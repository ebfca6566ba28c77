"""Billing end to end with a real worker: holds, per-subtask charges, settlement, quotas, top-ups."""
from __future__ import annotations

import os
import signal
import time
import uuid
from decimal import Decimal

import psutil
from sqlalchemy import select

from tests.support.accounts import balance_of, set_user
from tests.support.api import wait_for_task
from tests.support.servers import CeleryWorker


def ledger_state(task_id: str) -> dict:  # type: ignore[type-arg]
    from marketplace.billing.models import Hold, LedgerEntry
    from marketplace.infra.db import session_scope
    from marketplace.tasks.models import SubTask, Task

    tid = uuid.UUID(task_id)
    with session_scope() as session:
        charges = list(session.scalars(select(LedgerEntry).where(LedgerEntry.task_id == tid)))
        hold = session.scalar(select(Hold).where(Hold.task_id == tid))
        task = session.get(Task, tid)
        subs = list(session.scalars(select(SubTask).where(SubTask.task_id == tid)))
        return {
            "charges": [(c.kind, c.subtask_id, c.amount, c.settled) for c in charges],
            "hold": (hold.status, hold.amount), "cost": task.cost, "subtasks": {s.id: s for s in subs},
        }


def assert_settled(task_id: str, n: int, before: Decimal) -> Decimal:
    state = ledger_state(task_id)
    charges = state["charges"]
    assert len(charges) == n, charges
    assert all(kind == "charge" and settled for kind, _, _, settled in charges), charges
    assert {sid for _, sid, _, _ in charges} == set(state["subtasks"]), "one charge per subtask"
    total = -sum(amount for _, _, amount, _ in charges)
    assert total > 0
    assert state["cost"] == total
    assert state["hold"][0] == "released"
    assert balance_of_task_owner(task_id) == before - total
    return total


def balance_of_task_owner(task_id: str) -> Decimal:
    from marketplace.infra.db import session_scope
    from marketplace.tasks.models import Task
    from marketplace.users.models import User

    with session_scope() as session:
        task = session.get(Task, uuid.UUID(task_id))
        return session.get(User, task.user_id).balance


def test_done_task_has_one_charge_per_subtask_cost_is_their_sum_and_hold_is_released(client, user):  # type: ignore[no-untyped-def]
    before = balance_of(user["id"])
    bal = client.get("/v1/billing/balance", headers=user["headers"]).get_json()
    assert bal == {"balance": str(before), "held": "0.000000", "available": str(before)}

    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": list(range(12)), "batch_size": 2},
                       headers=user["headers"])
    assert resp.status_code == 202, resp.get_json()
    task_id = resp.get_json()["id"]
    estimate = Decimal(resp.get_json()["estimated_cost"])
    held = client.get("/v1/billing/balance", headers=user["headers"]).get_json()
    if held["held"] != "0.000000":  # unless it already finished
        assert Decimal(held["held"]) == estimate and Decimal(held["available"]) == before - estimate

    doc = wait_for_task(client, user["headers"], task_id)
    assert doc["status"] == "Done", doc
    total = assert_settled(task_id, 6, before)
    assert Decimal(doc["cost"]) == total and isinstance(doc["cost"], str)
    assert total <= estimate

    after = client.get("/v1/billing/balance", headers=user["headers"]).get_json()
    assert after == {"balance": str(before - total), "held": "0.000000", "available": str(before - total)}

    # Ledger: newest first, filtered by task, keyset pages that cover every charge once.
    seen, cursor = [], None
    while True:
        url = f"/v1/billing/ledger?task_id={task_id}&limit=4" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(url, headers=user["headers"]).get_json()
        seen += page["entries"]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == 6 and len({e["id"] for e in seen}) == 6
    assert [e["id"] for e in seen] == sorted((e["id"] for e in seen), reverse=True)
    entry = seen[0]
    assert set(entry) == {"id", "kind", "amount", "task_id", "subtask_id", "detail", "settled", "created_at"}
    assert entry["settled"] is True  # the task settled when it finished
    assert entry["kind"] == "charge" and entry["task_id"] == task_id and entry["subtask_id"]
    assert isinstance(entry["amount"], str) and Decimal(entry["amount"]) < 0
    assert sum(Decimal(e["amount"]) for e in seen) == -total

    whole = client.get("/v1/billing/ledger", headers=user["headers"]).get_json()["entries"]
    assert whole[-1]["kind"] == "signup"
    assert client.get("/v1/billing/ledger?limit=0", headers=user["headers"]).status_code == 422
    assert client.get("/v1/billing/ledger?task_id=nope", headers=user["headers"]).status_code == 422


def test_failed_subtask_is_charged_per_the_price_card(client, user):  # type: ignore[no-untyped-def]
    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": ["a", "bad", "c"], "batch_size": 1,
                                          "params": {"fail_items": ["bad"]}}, headers=user["headers"])
    task_id = resp.get_json()["id"]
    doc = wait_for_task(client, user["headers"], task_id, timeout=120)
    assert doc["status"] == "Failed"
    state = ledger_state(task_id)
    failed = [c for c in state["charges"] if c[0] == "charge_failed"]
    assert len(failed) == 1
    assert failed[0][2] == Decimal("-0.000100")  # the price card's echo/cpu: failed → its start fee, 0.0001
    assert len({sid for _, sid, _, _ in state["charges"]}) == len(state["charges"])
    assert state["hold"][0] == "released"
    assert state["cost"] == -sum(c[2] for c in state["charges"])
    # One form of detail whichever path wrote the charge (a failed one read echo/cpu.generic).
    details = [e["detail"] for e in client.get(f"/v1/billing/ledger?task_id={task_id}",
                                               headers=user["headers"]).get_json()["entries"]]
    assert details and all(d.startswith("echo/cpu ") and " items " in d for d in details), details


def test_insufficient_balance_is_402_naming_balance_and_estimate(client, user):  # type: ignore[no-untyped-def]
    set_user(user["id"], balance=Decimal("0.001"))
    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": [1, 2, 3]}, headers=user["headers"])
    assert resp.status_code == 402, resp.get_json()
    body = resp.get_json()
    assert resp.content_type == "application/problem+json"
    assert body["balance"] == "0.001000" and Decimal(body["estimate"]) > Decimal("0.001")
    assert "balance" in body["detail"]
    assert client.get("/v1/tasks?limit=5", headers=user["headers"]).get_json().get("tasks", []) == []


def test_each_quota_is_a_429_naming_it(client, user):  # type: ignore[no-untyped-def]
    h = user["headers"]
    set_user(user["id"], max_items_per_task=5)
    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": list(range(6))}, headers=h)
    assert resp.status_code == 429 and resp.get_json()["quota"] == "max_items_per_task", resp.get_json()

    set_user(user["id"], max_items_per_task=None, max_active_tasks=1)
    slow = client.post("/v1/tasks", json={"model": "echo", "inputs": [1], "params": {"sleep_s": 2}}, headers=h)
    assert slow.status_code == 202
    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": [1]}, headers=h)
    assert resp.status_code == 429 and resp.get_json()["quota"] == "max_active_tasks", resp.get_json()
    wait_for_task(client, h, slow.get_json()["id"], timeout=90)

    set_user(user["id"], max_active_tasks=None, daily_spend_limit=Decimal("0.01"))
    first = client.post("/v1/tasks", json={"model": "echo", "inputs": [1]}, headers=h)
    assert first.status_code == 202, first.get_json()  # estimate 0.0061 fits under 0.01
    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": [2]}, headers=h)
    assert resp.status_code == 429, resp.get_json()
    body = resp.get_json()
    assert body["quota"] == "daily_spend_limit" and Decimal(body["limit"]) == Decimal("0.01") and "daily_spend_limit" in body["detail"]
    wait_for_task(client, h, first.get_json()["id"], timeout=90)

    from marketplace.billing import quotas
    from marketplace.infra.db import session_scope

    with session_scope() as session:
        usage = quotas.usage(session, user_id=uuid.UUID(user["id"]))
    assert usage["active_tasks"] == 0 and Decimal(usage["spent_today"]) > 0


def test_topup_is_admin_only_and_credits_the_user(client, user, admin):  # type: ignore[no-untyped-def]
    before = balance_of(user["id"])
    body = {"user_id": user["id"], "amount": "12.50"}
    assert client.post("/v1/billing/topup", json=body, headers=user["headers"]).status_code == 403
    resp = client.post("/v1/billing/topup", json=body, headers=admin["headers"])
    assert resp.status_code == 201, resp.get_json()
    doc = resp.get_json()
    assert doc["entry"]["kind"] == "topup" and doc["entry"]["amount"] == "12.500000"
    assert balance_of(user["id"]) == before + Decimal("12.5")
    assert doc["balance"] == str(before + Decimal("12.5"))
    entries = client.get("/v1/billing/ledger", headers=user["headers"]).get_json()["entries"]
    assert entries[0]["kind"] == "topup" and entries[0]["amount"] == "12.500000" and entries[0]["settled"] is True
    # 1e30: past the 28-digit decimal context, which quantizing overflowed (a 500).
    for bad in (12.5, "-1", "0", "abc", "1.0000001", "1e30", "1" * 40):
        r = client.post("/v1/billing/topup", json={"user_id": user["id"], "amount": bad}, headers=admin["headers"])
        assert r.status_code == 422, (bad, r.get_json())
        assert r.get_json()["errors"][0]["field"] == "amount"
    missing = {"user_id": str(uuid.uuid4()), "amount": "1"}
    assert client.post("/v1/billing/topup", json=missing, headers=admin["headers"]).status_code == 404
    assert balance_of(user["id"]) == before + Decimal("12.5")


def _running_on(task_id: str, hostname: str) -> bool:
    from marketplace.infra.db import session_scope
    from marketplace.tasks.models import SubTask

    with session_scope() as session:
        return session.scalar(select(SubTask.id).where(
            SubTask.task_id == uuid.UUID(task_id), SubTask.status == "Running", SubTask.worker == hostname
        ).limit(1)) is not None


def test_sigkill_of_a_pool_child_mid_subtask_still_charges_each_subtask_once(client, user, redis_client):  # type: ignore[no-untyped-def]
    node = CeleryWorker(["cpu.generic"], name=f"billing-kill-{uuid.uuid4().hex[:4]}", concurrency=1)
    try:
        node.wait_ready(redis_client)
        before = balance_of(user["id"])
        resp = client.post("/v1/tasks", json={"model": "echo", "inputs": list(range(6)), "batch_size": 1,
                                              "params": {"sleep_s": 1.5}}, headers=user["headers"])
        assert resp.status_code == 202, resp.get_json()
        task_id = resp.get_json()["id"]
        deadline = time.monotonic() + 60
        while not _running_on(task_id, node.hostname):
            assert time.monotonic() < deadline, f"no subtask ran on {node.hostname}:\n{node.tail()}"
            time.sleep(0.05)
        time.sleep(0.3)  # well inside the 1.5 s item
        children = psutil.Process(node.proc.pid).children()
        assert len(children) == 1, children
        os.kill(children[0].pid, signal.SIGKILL)

        doc = wait_for_task(client, user["headers"], task_id, timeout=120)
        assert doc["status"] == "Done", doc
        state = ledger_state(task_id)
        assert max(s.attempts for s in state["subtasks"].values()) >= 2, "the killed subtask ran again"
        # The redelivered subtask's late signal may land a moment after finalize: nothing may change then.
        time.sleep(1.0)
        assert_settled(task_id, 6, before)
    finally:
        node.stop()


def test_cancel_settles_what_ran_releases_the_hold_and_late_charges_are_settled_too(client, user):  # type: ignore[no-untyped-def]
    before = balance_of(user["id"])
    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": list(range(8)), "batch_size": 1,
                                          "params": {"sleep_s": 1.0}}, headers=user["headers"])
    task_id = resp.get_json()["id"]
    deadline = time.monotonic() + 60
    while client.get(f"/v1/tasks/{task_id}", headers=user["headers"]).get_json()["progress"]["done"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert client.post(f"/v1/tasks/{task_id}/cancel", headers=user["headers"]).status_code == 202
    assert wait_for_task(client, user["headers"], task_id)["status"] == "Cancelled"
    time.sleep(3.0)  # subtasks that were running finish and are charged after the settlement
    state = ledger_state(task_id)
    assert state["hold"][0] == "released"
    assert all(settled for *_, settled in state["charges"]), state["charges"]
    finished = [s for s in state["subtasks"].values() if s.status in ("Done", "Failed")]
    assert len(state["charges"]) == len(finished) < 8
    total = -sum(amount for _, _, amount, _ in state["charges"])
    assert state["cost"] == total and balance_of(user["id"]) == before - total >= 0
    assert client.get(f"/v1/tasks/{task_id}", headers=user["headers"]).get_json()["cost"] == str(total)
    from marketplace.audit import service as audit
    from marketplace.infra.db import session_scope

    audit.chain_pending()
    with session_scope() as session:
        records, _ = audit.list_records(session, task_id=task_id, limit=1000)
    actions = [r["action"] for r in records]
    assert "task.cancel_requested" in actions and "task.cancelled" in actions
    print("settlements:", actions.count("billing.settled"), "charges:", len(state["charges"]))

"""Prices against the price card (config/models.yaml), every expected amount worked out by hand.

The card's numbers are written here as literals on purpose: a formula or a catalog that
drifts from the card fails these tests, where a test that asked `subtask_cost` for its
expectation could not. A change of the card itself means changing the literals too.

    model      device  start_fee  per_second  per_item  failed     time_limit
    echo       cpu     0.0001     0.0001      0.000001  start_fee   60
    embedding  cpu     0.001      0.002       0.00005   start_fee  300
    embedding  gpu     0.002      0.01        0.00002   start_fee  300
    resnet50   cpu     0.002      0.004       0.0002    start_fee  600
    resnet50   gpu     0.005      0.02        0.0001    start_fee  600
    generic    cpu     0.001      0.003       0.00001   full       600
"""
from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

import pytest

from marketplace.billing.service import estimate_cost, price_for, subtask_cost
from marketplace.catalog import Catalog, Price, load_catalog
from tests.support.api import wait_for_task
from tests.support.servers import ROOT
from tests.support.wait import wait_until

D = Decimal


@pytest.fixture(scope="module")
def card() -> Catalog:
    """The price card file itself (not whatever MARKETPLACE_CATALOG_PATH names)."""
    return load_catalog(ROOT / "config" / "models.yaml")


@pytest.mark.parametrize(("model", "device", "seconds", "items", "expected"), [
    # start fee alone: nothing ran, nothing processed
    ("echo", "cpu", 0.0, 0, "0.000100"),
    # per item: 0.0001 + 250 × 0.000001 = 0.0001 + 0.00025
    ("echo", "cpu", 0.0, 250, "0.000350"),
    # per second: 0.001 + 2.5 × 0.003 = 0.001 + 0.0075
    ("generic", "cpu", 2.5, 0, "0.008500"),
    # all three: 0.0001 + 0.5 × 0.0001 + 1000 × 0.000001 = 0.0001 + 0.00005 + 0.001
    ("echo", "cpu", 0.5, 1000, "0.001150"),
    # embedding, CPU: 0.001 + 1.5 × 0.002 + 64 × 0.00005 = 0.001 + 0.003 + 0.0032
    ("embedding", "cpu", 1.5, 64, "0.007200"),
    # embedding, GPU: 0.002 + 1.5 × 0.01 + 64 × 0.00002 = 0.002 + 0.015 + 0.00128
    ("embedding", "gpu", 1.5, 64, "0.018280"),
    # resnet50, CPU: 0.002 + 3 × 0.004 + 16 × 0.0002 = 0.002 + 0.012 + 0.0032
    ("resnet50", "cpu", 3.0, 16, "0.017200"),
    # resnet50, GPU: 0.005 + 3 × 0.02 + 16 × 0.0001 = 0.005 + 0.06 + 0.0016
    ("resnet50", "gpu", 3.0, 16, "0.066600"),
    # rounded to 6 decimals: 0.001 + 1.234567 × 0.003 + 3 × 0.00001 = 0.001 + 0.003703701 + 0.00003
    #   = 0.004733701 → 0.004734
    ("generic", "cpu", 1.234567, 3, "0.004734"),
    # half up: 0.0001 + 0.005 × 0.0001 = 0.0001005 → 0.000101 (half even would give 0.000100)
    ("echo", "cpu", 0.005, 0, "0.000101"),
    # below half: 0.0001 + 0.123456 × 0.0001 = 0.0001123456 → 0.000112
    ("echo", "cpu", 0.123456, 0, "0.000112"),
])
def test_a_finished_subtask_costs_start_fee_plus_seconds_plus_items(  # type: ignore[no-untyped-def]
    card, model: str, device: str, seconds: float, items: int, expected: str,
) -> None:
    cost = subtask_cost(price_for(card.get(model), device), seconds=seconds, items=items, ok=True)
    assert cost == D(expected)
    assert str(cost) == expected  # six decimals, as the ledger and the API show it


@pytest.mark.parametrize(("model", "device", "expected"), [
    # generic, failed: full → as if it had finished: 0.001 + 2.5 × 0.003 + 10 × 0.00001
    #   = 0.001 + 0.0075 + 0.0001
    ("generic", "cpu", "0.008600"),
    # echo, failed: start_fee → 0.0001, whatever ran
    ("echo", "cpu", "0.000100"),
    # embedding on the GPU, failed: start_fee → the GPU's 0.002, not the CPU's 0.001
    ("embedding", "gpu", "0.002000"),
    ("embedding", "cpu", "0.001000"),
    # resnet50, failed: start_fee → 0.005 (GPU), 0.002 (CPU)
    ("resnet50", "gpu", "0.005000"),
    ("resnet50", "cpu", "0.002000"),
])
def test_a_failed_subtask_is_charged_per_the_cards_failed_rule(  # type: ignore[no-untyped-def]
    card, model: str, device: str, expected: str,
) -> None:
    # 2.5 s and 10 items: what a full charge would count, and a start_fee one must not.
    cost = subtask_cost(price_for(card.get(model), device), seconds=2.5, items=10, ok=False)
    assert cost == D(expected)


def test_failed_nothing_charges_nothing_and_the_rule_only_applies_to_failures() -> None:
    # No model of the card says `nothing` today: the rule itself, on a card line written here.
    price = Price(start_fee=D("0.5"), per_second=D("0.25"), per_item=D("0.125"), failed="nothing")
    assert subtask_cost(price, seconds=2.0, items=4, ok=False) == 0
    # ok: 0.5 + 2 × 0.25 + 4 × 0.125 = 0.5 + 0.5 + 0.5
    assert subtask_cost(price, seconds=2.0, items=4, ok=True) == D("1.500000")
    start_fee = price.model_copy(update={"failed": "start_fee"})
    assert subtask_cost(start_fee, seconds=2.0, items=4, ok=False) == D("0.500000")
    full = price.model_copy(update={"failed": "full"})
    assert subtask_cost(full, seconds=2.0, items=4, ok=False) == D("1.500000")


@pytest.mark.parametrize(("model", "device", "batches", "expected"), [
    # every subtask to its time limit: echo 6 × (0.0001 + 60 × 0.0001) + 12 × 0.000001
    #   = 6 × 0.0061 + 0.000012 = 0.0366 + 0.000012
    ("echo", "cpu", [2] * 6, "0.036612"),
    # embedding CPU: 3 × (0.001 + 300 × 0.002) + 138 × 0.00005 = 3 × 0.601 + 0.0069 = 1.803 + 0.0069
    ("embedding", "cpu", [64, 64, 10], "1.809900"),
    # embedding GPU: 2 × (0.002 + 300 × 0.01) + 300 × 0.00002 = 2 × 3.002 + 0.006 = 6.004 + 0.006
    ("embedding", "gpu", [256, 44], "6.010000"),
    # resnet50 CPU: 2 × (0.002 + 600 × 0.004) + 32 × 0.0002 = 2 × 2.402 + 0.0064 = 4.804 + 0.0064
    ("resnet50", "cpu", [16, 16], "4.810400"),
    # resnet50 GPU: 1 × (0.005 + 600 × 0.02) + 64 × 0.0001 = 12.005 + 0.0064
    ("resnet50", "gpu", [64], "12.011400"),
    # generic: 4 × (0.001 + 600 × 0.003) + 301 × 0.00001 = 4 × 1.801 + 0.00301 = 7.204 + 0.00301
    ("generic", "cpu", [100, 100, 100, 1], "7.207010"),
])
def test_the_estimate_is_every_subtask_at_its_time_limit(  # type: ignore[no-untyped-def]
    card, model: str, device: str, batches: list[int], expected: str,
) -> None:
    estimate = estimate_cost(card.get(model), device, items=sum(batches), subtasks=len(batches))
    assert estimate == D(expected) and str(estimate) == expected


# End to end: a real worker runs the job; the charges are read back over REST and checked
# against the card's numbers, written here again.
ECHO_CPU = {"start_fee": D("0.0001"), "per_second": D("0.0001"), "per_item": D("0.000001")}
GENERIC_CPU = {"start_fee": D("0.001"), "per_second": D("0.003"), "per_item": D("0.00001")}


def by_hand(card_line: dict[str, Decimal], *, seconds: float, items: int) -> Decimal:
    """start_fee + seconds × per_second + items × per_item, to 6 decimals half up: the card's words.
    `seconds` as the API recorded it (the worker rounds its clock to the microsecond)."""
    amount = card_line["start_fee"] + D(str(seconds)) * card_line["per_second"] + items * card_line["per_item"]
    return amount.quantize(D("0.000001"), rounding=ROUND_HALF_UP)


def _subtasks(client, headers, task_id: str) -> dict[str, dict]:  # type: ignore[no-untyped-def,type-arg]
    doc = client.get(f"/v1/tasks/{task_id}/subtasks", headers=headers).get_json()
    return {s["id"]: s for s in doc["subtasks"]}


def _ledger(client, headers, task_id: str) -> list[dict]:  # type: ignore[no-untyped-def,type-arg]
    return client.get(f"/v1/billing/ledger?task_id={task_id}", headers=headers).get_json()["entries"]


def test_an_echo_jobs_charges_are_the_card_times_what_each_subtask_recorded(client, user) -> None:  # type: ignore[no-untyped-def]
    h = user["headers"]
    # 7 items at most 3 a subtask: subtasks of 3, 2 and 2 (the scheduler evens them out); 0.4 s
    # per item keeps the per-second part in the sixth decimal (0.8 s × 0.0001 = 0.00008).
    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": list(range(7)), "batch_size": 3,
                                          "params": {"sleep_s": 0.4}}, headers=h)
    assert resp.status_code == 202, resp.get_json()
    task_id = resp.get_json()["id"]
    # The hold: 3 × (0.0001 + 60 × 0.0001) + 7 × 0.000001 = 0.0183 + 0.000007
    assert resp.get_json()["estimated_cost"] == "0.018307"
    doc = wait_for_task(client, h, task_id, timeout=120)
    assert doc["status"] == "Done", doc

    subtasks = _subtasks(client, h, task_id)
    assert sorted(s["items"] for s in subtasks.values()) == [2, 2, 3]
    assert all(s["seconds"] >= 0.4 * s["items"] for s in subtasks.values()), subtasks
    entries = _ledger(client, h, task_id)
    charged = {e["subtask_id"]: D(e["amount"]) for e in entries}
    assert [e["kind"] for e in entries] == ["charge"] * 3 and set(charged) == set(subtasks), entries
    for sid, sub in subtasks.items():
        assert charged[sid] == -by_hand(ECHO_CPU, seconds=sub["seconds"], items=sub["items"]), (sub, charged[sid])

    # The whole job: start_fee × K + per_item × N + per_second × each subtask's seconds.
    total = sum(by_hand(ECHO_CPU, seconds=s["seconds"], items=s["items"]) for s in subtasks.values())
    assert total >= 3 * D("0.0001") + 7 * D("0.000001") + D("0.0001") * D("2.8")  # 7 items × 0.4 s at least
    assert D(doc["cost"]) == total == -sum(charged.values())
    assert doc["cost"] == str(total)


def test_a_failed_generic_subtask_is_charged_in_full_per_the_card(client, user) -> None:  # type: ignore[no-untyped-def]
    h = user["headers"]
    # Exits 1 before printing anything: not retried, the subtask fails with the reason (workers/sandbox/base.py).
    resp = client.post("/v1/tasks", json={"model": "generic", "device": "cpu", "inputs": [1, 2, 3, 4],
                                          "params": {"command": ["/usr/bin/python3", "-c", "import sys; sys.exit(1)"],
                                                     "timeout_s": 30}}, headers=h)
    assert resp.status_code == 202, resp.get_json()
    task_id = resp.get_json()["id"]
    doc = wait_for_task(client, h, task_id, timeout=120)
    assert doc["status"] == "Failed" and "printed 0 output lines for 4 items" in doc["error"], doc

    [sub] = _subtasks(client, h, task_id).values()
    assert sub["status"] == "Failed" and sub["attempts"] == 1 and sub["items"] == 4, sub
    # The charge is written by the outcome's signal handler, which may land after the task is Failed.
    [entry] = wait_until(lambda: _ledger(client, h, task_id), timeout=30, what="the failed subtask's charge")
    assert entry["kind"] == "charge_failed" and entry["subtask_id"] == sub["id"], entry
    # failed: full → 0.001 + seconds × 0.003 + 4 × 0.00001, as if it had finished
    expected = by_hand(GENERIC_CPU, seconds=sub["seconds"], items=4)
    assert D(entry["amount"]) == -expected, (entry, sub)
    assert expected > D("0.001") + 4 * D("0.00001")  # the sandbox ran for a measurable time: seconds count
    wait_until(lambda: client.get(f"/v1/tasks/{task_id}", headers=h).get_json()["cost"] == str(expected),
               timeout=30, what="the task's cost to settle at the failed subtask's charge")

"""A finished task asks for its records to be chained: at most one request per CHAIN_DELAY,
and every task's records are chained by one of them (real workers, no beat)."""
from __future__ import annotations

import time

import pytest
from sqlalchemy import text

from tests.support.api import wait_for_task
from tests.support.wait import wait_until


def test_requests_within_the_delay_send_one_message(stack, redis_client, monkeypatch):  # type: ignore[no-untyped-def]
    from marketplace.audit import signals
    from marketplace.infra.celery_app import app

    sent: list[dict] = []  # type: ignore[type-arg]
    monkeypatch.setattr(app, "send_task", lambda name, **options: sent.append({"name": name, **options}))
    redis_client.delete(signals._CHAIN_REQUESTED)
    for _ in range(5):
        signals.request_chaining()
    assert [(m["name"], m["countdown"]) for m in sent] == [(signals.CHAIN_TASK, signals.CHAIN_DELAY)]
    time.sleep(signals.CHAIN_DELAY + 0.2)
    signals.request_chaining()
    assert len(sent) == 2
    redis_client.delete(signals._CHAIN_REQUESTED)  # none of these requests was really sent


def test_a_request_that_could_not_be_sent_does_not_hold_back_the_next(stack, redis_client, monkeypatch):  # type: ignore[no-untyped-def]
    from kombu.exceptions import OperationalError

    from marketplace.audit import signals
    from marketplace.infra.celery_app import app

    def broker_down(name, **options):  # type: ignore[no-untyped-def]
        raise OperationalError("broker unreachable")

    redis_client.delete(signals._CHAIN_REQUESTED)
    monkeypatch.setattr(app, "send_task", broker_down)
    with pytest.raises(OperationalError):
        signals.request_chaining()
    sent: list[str] = []
    monkeypatch.setattr(app, "send_task", lambda name, **options: sent.append(name))
    signals.request_chaining()
    assert sent == [signals.CHAIN_TASK]
    redis_client.delete(signals._CHAIN_REQUESTED)


def test_records_of_tasks_ending_together_are_all_chained(client, user):  # type: ignore[no-untyped-def]
    from marketplace.infra.db import get_engine

    ids = [client.post("/v1/tasks", json={"model": "echo", "inputs": [i, i + 1], "batch_size": 1},
                       headers=user["headers"]).get_json()["id"] for i in range(4)]
    for task_id in ids:
        assert wait_for_task(client, user["headers"], task_id)["status"] == "Done"

    def pending() -> int:
        with get_engine().connect() as conn:
            return conn.execute(text("SELECT count(*) FROM audit_pending WHERE task_id = ANY(:ids)"),
                                {"ids": ids}).scalar_one()

    wait_until(lambda: pending() == 0, 15, "the tasks' records chained")
    with get_engine().connect() as conn:
        done = conn.execute(text("SELECT count(DISTINCT task_id) FROM audit_records "
                                 "WHERE action = 'task.done' AND task_id = ANY(:ids)"), {"ids": ids}).scalar_one()
    assert done == len(ids)

"""Prometheus metrics: the API's /metrics and a worker node's exporter move when a job runs."""
from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.api import register, wait_for_task
from tests.support.wait import wait_until


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 if none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples(text).items() if n == name and want <= set(ls))


@pytest.fixture()
def user(client, obs_worker):  # type: ignore[no-untyped-def]
    return register(client)


def test_api_metrics_need_no_auth_and_move_after_a_job(client, user, obs_worker):  # type: ignore[no-untyped-def]
    before = client.get("/metrics")
    from prometheus_client import CONTENT_TYPE_LATEST

    # Exactly the exposition format's type: Flask's mimetype= appended a second "; charset=utf-8".
    assert before.status_code == 200 and before.content_type == CONTENT_TYPE_LATEST
    text0 = before.get_data(as_text=True)

    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": list(range(6)), "batch_size": 2},
                       headers=user["headers"])
    assert resp.status_code == 202, resp.get_json()
    task_id = resp.get_json()["id"]
    assert wait_for_task(client, user["headers"], task_id, timeout=90)["status"] == "Done"

    text1 = client.get("/metrics").get_data(as_text=True)
    assert value(text1, "flask_http_request_total", method="POST", status="202") == \
        value(text0, "flask_http_request_total", method="POST", status="202") + 1
    assert value(text1, "flask_http_request_duration_seconds_count", method="POST", status="202") >= 1
    assert value(text1, "marketplace_tasks_submitted_total", model="echo") == \
        value(text0, "marketplace_tasks_submitted_total", model="echo") + 1
    # State gauges, computed at scrape time from the registry and the broker.
    assert value(text1, "marketplace_workers_live", queue="cpu.generic") >= 1
    assert ("marketplace_workers_live", (("queue", "gpu.resnet50"),)) in samples(text1)
    assert ("marketplace_queue_depth", (("queue", "cpu.generic"),)) in samples(text1)
    assert value(text1, "marketplace_audit_chain_length") >= 0


def test_worker_exporter_aggregates_the_pool_children(client, user, obs_worker):  # type: ignore[no-untyped-def]
    text0 = obs_worker.scrape()
    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": list(range(8)), "batch_size": 2},
                       headers=user["headers"])
    task_id = resp.get_json()["id"]
    doc = wait_for_task(client, user["headers"], task_id, timeout=90)
    assert doc["status"] == "Done"

    done0 = value(text0, "marketplace_subtasks_total", queue="cpu.generic", outcome="done")

    def moved() -> str | None:
        text = obs_worker.scrape()
        finished = value(text, "marketplace_tasks_finished_total", model="echo", status="Done")
        counted = value(text, "marketplace_subtasks_total", queue="cpu.generic", outcome="done") >= done0 + 4
        # Each child writes its counter and its histogram to separate files: a scrape can fall between.
        timed = value(text, "marketplace_subtask_duration_seconds_count", queue="cpu.generic") >= done0 + 4
        before = value(text0, "marketplace_tasks_finished_total", model="echo", status="Done")
        return text if finished >= before + 1 and counted and timed else None

    text1 = wait_until(moved, timeout=30)
    assert value(text1, "marketplace_subtasks_total", queue="cpu.generic", outcome="done") == done0 + 4
    assert value(text1, "marketplace_subtask_duration_seconds_count", queue="cpu.generic") >= done0 + 4
    assert value(text1, "marketplace_subtask_duration_seconds_sum", queue="cpu.generic") > 0
    assert value(text1, "marketplace_credits_charged_total", model="echo") > \
        value(text0, "marketplace_credits_charged_total", model="echo")
    # The node exporter shows the shared state too.
    assert value(text1, "marketplace_workers_live", queue="cpu.generic") >= 1


def test_failed_tasks_and_subtasks_are_counted_by_status(client, user, obs_worker):  # type: ignore[no-untyped-def]
    text0 = obs_worker.scrape()
    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": ["a", "bad"], "batch_size": 1,
                                          "params": {"fail_items": ["bad"]}}, headers=user["headers"])
    task_id = resp.get_json()["id"]
    assert wait_for_task(client, user["headers"], task_id, timeout=90)["status"] == "Failed"

    failed0 = value(text0, "marketplace_subtasks_total", queue="cpu.generic", outcome="failed")

    def moved() -> str | None:
        # The subtask is counted when its run returns, a moment after it failed the task.
        text = obs_worker.scrape()
        before = value(text0, "marketplace_tasks_finished_total", model="echo", status="Failed")
        finished = value(text, "marketplace_tasks_finished_total", model="echo", status="Failed") > before
        counted = value(text, "marketplace_subtasks_total", queue="cpu.generic", outcome="failed") > failed0
        return text if finished and counted else None

    text1 = wait_until(moved, timeout=30)
    assert value(text1, "marketplace_subtasks_total", queue="cpu.generic", outcome="retry") > \
        value(text0, "marketplace_subtasks_total", queue="cpu.generic", outcome="retry")
    assert value(text1, "marketplace_subtasks_total", queue="cpu.generic", outcome="failed") == failed0 + 1


def test_queue_depth_counts_every_priority_list_of_a_queue(client, redis_client, obs_worker):  # type: ignore[no-untyped-def]
    """kombu keeps a Redis queue as `<queue>` plus `<queue>:<step>` lists; no worker consumes cpu.resnet50 here."""
    from marketplace.infra.celery_app import app

    queue = "cpu.resnet50"
    for priority in (0, 0, 3, 9):
        app.send_task("workers.run_subtask", args=["00000000-0000-0000-0000-000000000000"], queue=queue,
                      priority=priority)
    try:
        assert redis_client.llen(queue) == 2
        assert redis_client.llen(f"{queue}:3") == 1 and redis_client.llen(f"{queue}:9") == 1
        text = client.get("/metrics").get_data(as_text=True)
        assert value(text, "marketplace_queue_depth", queue=queue) == 4
        assert value(obs_worker.scrape(), "marketplace_queue_depth", queue=queue) == 4
    finally:
        redis_client.delete(queue, *(f"{queue}:{p}" for p in range(1, 10)))
    assert value(client.get("/metrics").get_data(as_text=True), "marketplace_queue_depth", queue=queue) == 0


def test_audit_chain_validity_comes_from_the_last_verification(client, redis_client):  # type: ignore[no-untyped-def]
    from marketplace.observability import metrics

    redis_client.delete(metrics.AUDIT_VERIFY_KEY)
    text = client.get("/metrics").get_data(as_text=True)
    assert "marketplace_audit_chain_valid" not in text  # absent until a verification ran (alert: missing)
    metrics.record_audit_verification(valid=False, length=3)
    assert value(client.get("/metrics").get_data(as_text=True), "marketplace_audit_chain_valid") == 0
    metrics.record_audit_verification(valid=True, length=3)
    assert value(client.get("/metrics").get_data(as_text=True), "marketplace_audit_chain_valid") == 1

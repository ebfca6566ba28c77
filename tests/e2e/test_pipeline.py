"""The spine end to end: REST → scheduler → fair release of subtasks to a real worker → finalize."""
from __future__ import annotations

import math

import pytest

from tests.support.api import register, wait_for_task


@pytest.fixture()
def user(client, worker):  # type: ignore[no-untyped-def]
    return register(client)


def test_echo_job_runs_to_done_with_outputs_in_input_order(client, user):  # type: ignore[no-untyped-def]
    inputs = [{"n": i, "s": f"item-{i}"} if i % 3 else i for i in range(250)]
    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": inputs, "batch_size": 10}, headers=user["headers"])
    assert resp.status_code == 202, resp.get_json()
    body = resp.get_json()
    assert body["status"] == "Created" and body["subtasks"] == 25 and body["model"] == "echo"

    doc = wait_for_task(client, user["headers"], body["id"])
    assert doc["status"] == "Done", doc
    assert doc["progress"] == {"done": 25, "failed": 0, "total": 25}
    assert doc["queue"] == "cpu.generic"
    assert doc["created_at"] <= doc["scheduled_at"] <= doc["started_at"] <= doc["finished_at"]

    subs = client.get(f"/v1/tasks/{body['id']}/subtasks", headers=user["headers"]).get_json()["subtasks"]
    assert [s["index"] for s in subs] == list(range(25))
    assert all(s["status"] == "Done" and s["worker"] and s["attempts"] == 1 for s in subs)

    result = client.get(f"/v1/tasks/{body['id']}/result", headers=user["headers"])
    assert result.status_code == 200
    assert result.get_json() == {"task_id": body["id"], "model": "echo", "outputs": inputs}


def test_result_before_done_is_409_and_unknown_task_is_404(client, user):  # type: ignore[no-untyped-def]
    # Its one subtask takes two seconds: the result is asked for while it runs, on any machine.
    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": [1], "params": {"sleep_s": 2}},
                       headers=user["headers"])
    task_id = resp.get_json()["id"]
    early = client.get(f"/v1/tasks/{task_id}/result", headers=user["headers"])
    assert early.status_code == 409, early.get_json()
    assert early.content_type == "application/problem+json"
    assert client.get("/v1/tasks/00000000-0000-0000-0000-000000000000", headers=user["headers"]).status_code == 404
    assert client.get("/v1/tasks/not-a-uuid", headers=user["headers"]).status_code == 404
    wait_for_task(client, user["headers"], task_id)


def test_failing_subtask_is_retried_then_fails_the_task_and_what_did_not_run_is_cancelled(client, user):  # type: ignore[no-untyped-def]
    from marketplace.settings import get_settings

    inputs = ["a", "b", "bad", "c", "d", "e"]
    resp = client.post(
        "/v1/tasks",
        json={"model": "echo", "inputs": inputs, "batch_size": 2, "params": {"fail_items": ["bad"]}},
        headers=user["headers"],
    )
    task_id = resp.get_json()["id"]
    doc = wait_for_task(client, user["headers"], task_id)
    assert doc["status"] == "Failed"
    assert "subtask 1 failed" in doc["error"] and "bad" in doc["error"]

    subs = {s["index"]: s for s in client.get(f"/v1/tasks/{task_id}/subtasks", headers=user["headers"]).get_json()["subtasks"]}
    assert subs[1]["status"] == "Failed"
    assert subs[1]["attempts"] == get_settings().subtask_max_retries + 1  # first try + bounded retries
    # Nothing of a final task stays open: what ran is Done, what had not is Cancelled.
    assert {s["status"] for i, s in subs.items() if i != 1} <= {"Done", "Cancelled"}, subs
    assert client.get(f"/v1/tasks/{task_id}/result", headers=user["headers"]).status_code == 409
    # The subtasks that finished were charged: their outputs are the user's, the failed one's are null.
    partial = client.get(f"/v1/tasks/{task_id}/result?partial=true", headers=user["headers"])
    assert partial.status_code == 200, partial.get_json()
    doc = partial.get_json()
    done = {i for i, s in subs.items() if s["status"] == "Done"}
    assert doc["outputs"] == [x if i // 2 in done else None for i, x in enumerate(inputs)]
    assert doc["status"] == "Failed" and doc["complete"] is False
    assert [(m["index"], m["first_item"], m["items"], m["status"]) for m in doc["missing"]
            if m["index"] == 1] == [(1, 2, 2, "Failed")]
    assert "bad" in doc["missing"][0]["error"]


def test_a_small_task_is_finished_by_its_last_subtask_and_a_big_one_by_a_finalize_message(client, user):  # type: ignore[no-untyped-def]
    from celery.result import AsyncResult

    from marketplace.infra.celery_app import app
    from workers.runner import INLINE_FINALIZE_MAX_SUBTASKS

    outcomes = {}
    for subtasks in (1, INLINE_FINALIZE_MAX_SUBTASKS + 4):
        inputs = list(range(subtasks))
        resp = client.post("/v1/tasks", json={"model": "echo", "inputs": inputs, "batch_size": 1},
                           headers=user["headers"])
        task_id = resp.get_json()["id"]
        assert wait_for_task(client, user["headers"], task_id)["status"] == "Done"
        result = client.get(f"/v1/tasks/{task_id}/result", headers=user["headers"]).get_json()
        assert result["outputs"] == inputs
        finalize = AsyncResult(f"{task_id}:finalize:last", app=app)
        if subtasks <= INLINE_FINALIZE_MAX_SUBTASKS:
            # Its subtask finished it: no finalize message was sent (Done is only reached after the
            # decision, so a message would be stored by now).
            assert finalize.state == "PENDING" and not app.backend.client.exists(
                app.backend.get_key_for_task(finalize.id))
            outcomes[subtasks] = "inline"
        else:
            # The finalize its last subtask sent joined it. Two finishing at once may both send one,
            # under the same id: it holds "done" or "noop".
            assert finalize.get(timeout=30) in ("done", "noop")
            outcomes[subtasks] = "message"
        # Subtask results are not stored in the backend: nothing reads them, the row is the truth.
        subs = client.get(f"/v1/tasks/{task_id}/subtasks", headers=user["headers"]).get_json()["subtasks"]
        stored = [app.backend.client.exists(app.backend.get_key_for_task(f"{s['id']}:1")) for s in subs]
        assert len(stored) == subtasks and not any(stored), stored
    assert outcomes == {1: "inline", INLINE_FINALIZE_MAX_SUBTASKS + 4: "message"}, outcomes


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@pytest.mark.slow
def test_embedding_job_returns_384_dim_vectors_with_meaningful_similarity(client, user):  # type: ignore[no-untyped-def]
    sentences = [
        "A man is playing a guitar.",
        "Someone is strumming a guitar.",
        "The stock market fell sharply today.",
    ]
    resp = client.post("/v1/tasks", json={"model": "embedding", "inputs": sentences, "device": "cpu", "batch_size": 2},
                       headers=user["headers"])
    assert resp.status_code == 202, resp.get_json()
    doc = wait_for_task(client, user["headers"], resp.get_json()["id"], timeout=180)
    assert doc["status"] == "Done", doc
    outputs = client.get(f"/v1/tasks/{doc['id']}/result", headers=user["headers"]).get_json()["outputs"]
    assert [len(v) for v in outputs] == [384, 384, 384]
    assert _cos(outputs[0], outputs[1]) > _cos(outputs[0], outputs[2]) + 0.2

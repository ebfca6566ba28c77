"""Request validation: every failure is problem+json naming the field; 400/404/405/413 are JSON too."""
from __future__ import annotations

import pytest

PROBLEM = "application/problem+json"


def _fields(resp) -> set[str]:  # type: ignore[no-untyped-def]
    assert resp.content_type == PROBLEM, resp.data
    return {e["field"] for e in resp.get_json()["errors"]}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": "no-such-model", "inputs": [1]}, "model"),
        ({"model": "echo", "inputs": []}, "inputs"),
        ({"model": "echo"}, "inputs"),
        ({"model": "echo", "inputs": "abc"}, "inputs"),
        ({"model": "embedding", "inputs": ["ok", 42, ""]}, "inputs[1]"),
        ({"model": "resnet50", "inputs": ["not-a-file-ref"]}, "inputs[0]"),
        ({"model": "echo", "inputs": [1], "device": "tpu"}, "device"),
        ({"model": "echo", "inputs": [1], "device": "gpu"}, "device"),  # echo runs on cpu only
        ({"model": "echo", "inputs": [1], "priority": 10}, "priority"),
        ({"model": "echo", "inputs": [1], "priority": -1}, "priority"),
        ({"model": "echo", "inputs": [1], "batch_size": 0}, "batch_size"),
        # Not guessed at: a string or a boolean where a number belongs (true was priority 1).
        ({"model": "echo", "inputs": [1], "priority": True}, "priority"),
        ({"model": "echo", "inputs": [1], "priority": "5"}, "priority"),
        ({"model": "echo", "inputs": [1], "batch_size": "5"}, "batch_size"),
        ({"model": "echo", "inputs": [1], "batch_size": 2.5}, "batch_size"),
        ({"model": "echo", "inputs": [1], "webhook_url": "ftp://example.com/hook"}, "webhook_url"),
        ({"model": "echo", "inputs": [1], "webhook_url": "file:///etc/passwd"}, "webhook_url"),
        ({"model": "echo", "inputs": [1], "surprise": True}, "surprise"),
        ({"model": "echo", "inputs": ["a\u0000b"]}, "inputs[0]"),
        ({"model": "echo", "inputs": [1], "redundancy": 0}, "redundancy"),
        ({"model": "echo", "inputs": [1], "redundancy": 6}, "redundancy"),
        ({"model": "echo", "inputs": [1], "redundancy": "2"}, "redundancy"),
        ({"model": "echo", "inputs": [1], "redundancy": True}, "redundancy"),
    ],
)
def test_bad_task_bodies_are_422_naming_the_field(client, user, body, field):  # type: ignore[no-untyped-def]
    resp = client.post("/v1/tasks", json=body, headers=user["headers"])
    assert resp.status_code == 422, resp.get_json()
    assert field in _fields(resp)
    assert resp.get_json()["status"] == 422 and resp.get_json()["title"] == "Validation failed"


def test_every_invalid_field_is_named(client, user):  # type: ignore[no-untyped-def]
    resp = client.post("/v1/tasks", json={"model": "", "inputs": [], "priority": 42, "device": "x"},
                       headers=user["headers"])
    assert resp.status_code == 422
    assert {"model", "inputs", "priority", "device"} <= _fields(resp)


def test_too_many_inputs_is_422(client, user, monkeypatch):  # type: ignore[no-untyped-def]
    from marketplace.settings import get_settings

    monkeypatch.setattr(get_settings(), "max_inputs", 5)
    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": list(range(6))}, headers=user["headers"])
    assert resp.status_code == 422 and "inputs" in _fields(resp)


def test_bad_idempotency_key_is_422(client, user):  # type: ignore[no-untyped-def]
    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": [1]},
                       headers={**user["headers"], "Idempotency-Key": "k" * 300})
    assert resp.status_code == 422 and "Idempotency-Key" in _fields(resp)


def test_malformed_json_is_400_and_non_json_is_400(client, user):  # type: ignore[no-untyped-def]
    resp = client.post("/v1/tasks", data='{"model": "echo", "inputs": [1', content_type="application/json",
                       headers=user["headers"])
    assert resp.status_code == 400 and resp.content_type == PROBLEM
    assert "not valid JSON" in resp.get_json()["detail"]
    resp = client.post("/v1/tasks", data="model=echo", content_type="text/plain", headers=user["headers"])
    assert resp.status_code == 400 and resp.content_type == PROBLEM
    resp = client.post("/v1/tasks", json=[1, 2], headers=user["headers"])
    assert resp.status_code == 422 and "body" in _fields(resp)


def test_oversize_body_is_413_problem(make_app, stack):  # type: ignore[no-untyped-def]
    from tests.support.api import register

    small = make_app(max_body_bytes=2048)
    c = small.test_client()
    u = register(c)
    resp = c.post("/v1/tasks", json={"model": "echo", "inputs": ["x" * 4096]}, headers=u["headers"])
    assert resp.status_code == 413 and resp.content_type == PROBLEM
    assert resp.get_json()["status"] == 413
    ok = c.post("/v1/tasks", json={"model": "echo", "inputs": ["x" * 100]}, headers=u["headers"])
    assert ok.status_code == 202
    # Chunked (no Content-Length, as gunicorn passes it on): werkzeug cuts it at the limit without
    # an error, which read as "not valid JSON" (400).
    import io
    import json

    for size, status in ((4096, 413), (100, 202)):
        body = json.dumps({"model": "echo", "inputs": ["x" * size]}).encode()
        resp = c.post("/v1/tasks", input_stream=io.BytesIO(body), content_type="application/json",
                      headers=u["headers"], environ_overrides={"wsgi.input_terminated": True, "CONTENT_LENGTH": ""})
        assert resp.status_code == status, (size, resp.get_json())


def test_unknown_route_is_404_json_and_wrong_method_is_405_json(client, user):  # type: ignore[no-untyped-def]
    resp = client.get("/v1/nothing-here")
    assert resp.status_code == 404 and resp.content_type == PROBLEM and resp.get_json()["status"] == 404
    assert b"<html" not in resp.data.lower()
    resp = client.delete("/v1/tasks", headers=user["headers"])
    assert resp.status_code == 405 and resp.content_type == PROBLEM
    assert "GET" in resp.headers["Allow"] and "POST" in resp.headers["Allow"]


def test_bad_list_query_is_422(client, user):  # type: ignore[no-untyped-def]
    for query, field in (("status=Sleeping", "status"), ("limit=0", "limit"), ("limit=1000", "limit"),
                         ("cursor=%21%21", "cursor"), ("colour=red", "colour")):
        resp = client.get(f"/v1/tasks?{query}", headers=user["headers"])
        assert resp.status_code == 422, (query, resp.get_json())
        assert field in _fields(resp), query


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": "echo", "inputs": [1], "params": {"sleep_s": -1}}, "params.sleep_s"),
        ({"model": "echo", "inputs": [1], "params": {"sleep_s": "1"}}, "params.sleep_s"),
        ({"model": "echo", "inputs": [1], "params": {"slep_s": 1}}, "params.slep_s"),  # a typo is not ignored
        ({"model": "embedding", "inputs": ["a"], "params": {"encode_batch_size": 0}}, "params.encode_batch_size"),
        ({"model": "embedding", "inputs": ["a"], "params": {"normalize": "yes"}}, "params.normalize"),
        ({"model": "resnet50", "inputs": ["x"], "params": {"top_k": 50}}, "params.top_k"),
        ({"model": "resnet50", "inputs": ["x"], "params": {"version": "../../etc"}}, "params.version"),
        # Never pushed: the job failed on the node, a start fee per subtask later.
        ({"model": "resnet50", "inputs": [{"file": "00000000-0000-0000-0000-000000000000"}],
          "params": {"version": "never-pushed"}}, "params.version"),
        ({"model": "generic", "inputs": [1]}, "params.command"),
        ({"model": "generic", "inputs": [1], "params": {"command": "echo hi"}}, "params.command"),
        ({"model": "generic", "inputs": [1], "params": {"command": ["echo", ""]}}, "params.command[1]"),
        ({"model": "generic", "inputs": [1], "params": {"command": ["echo"], "timeout_s": 601}}, "params.timeout_s"),
        ({"model": "generic", "inputs": [1], "params": {"command": ["echo"], "memory_mb": 1.5}}, "params.memory_mb"),
    ],
)
def test_bad_model_params_are_422_at_submit_not_a_failed_subtask_later(client, user, body, field):  # type: ignore[no-untyped-def]
    resp = client.post("/v1/tasks", json=body, headers=user["headers"])
    assert resp.status_code == 422, resp.get_json()
    assert field in _fields(resp), resp.get_json()


def test_a_weights_version_never_pushed_is_named_at_submit(client, user):  # type: ignore[no-untyped-def]
    body = {"model": "resnet50", "inputs": [{"file": "00000000-0000-0000-0000-000000000000"}],
            "params": {"version": "never-pushed"}}
    error = client.post("/v1/tasks", json=body, headers=user["headers"]).get_json()["errors"][0]
    assert error["field"] == "params.version"
    assert "no weights pushed for resnet50 version 'never-pushed'" in error["message"]
    assert "marketplace models push resnet50 FILE --version never-pushed" in error["message"]


def test_good_model_params_are_accepted(client, user):  # type: ignore[no-untyped-def]
    from sqlalchemy import text

    from marketplace.infra.db import get_engine

    resp = client.post("/v1/tasks", json={"model": "generic", "inputs": [1], "params": {
        "command": ["/bin/cat"], "timeout_s": 5, "memory_mb": 128}}, headers=user["headers"])
    assert resp.status_code == 202, resp.get_json()
    echo = client.post("/v1/tasks", json={"model": "echo", "inputs": [1], "params": {"sleep_s": 0, "fail_items": []}},
                       headers=user["headers"])
    assert echo.status_code == 202, echo.get_json()
    with get_engine().connect() as conn:
        stored = conn.execute(text("SELECT params FROM tasks WHERE id = :t"), {"t": resp.get_json()["id"]}).scalar()
    assert stored == {"command": ["/bin/cat"], "timeout_s": 5, "memory_mb": 128}


def test_redundancy_under_the_users_minimum_is_422_and_absent_takes_it(client, user):  # type: ignore[no-untyped-def]
    from sqlalchemy import text

    from marketplace.infra.db import get_engine

    with get_engine().begin() as conn:
        conn.execute(text("UPDATE users SET min_redundancy = 3 WHERE id = :id"), {"id": user["id"]})
    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": [1], "redundancy": 2}, headers=user["headers"])
    assert resp.status_code == 422 and _fields(resp) == {"redundancy"}
    assert "at least 3" in resp.get_json()["errors"][0]["message"]
    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": [1]}, headers=user["headers"])
    assert resp.status_code == 202 and resp.get_json()["redundancy"] == 3 and resp.get_json()["subtasks"] == 3

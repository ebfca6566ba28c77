"""Hostile bodies: clear 4xx problems, never a 500, and nothing stored."""
from __future__ import annotations

import base64
import io

import pytest
from sqlalchemy import text

from tests.support.api import register


@pytest.fixture()
def user(client):  # type: ignore[no-untyped-def]
    return register(client)


def _count(table: str, user_id: str) -> int:
    from marketplace.infra.db import get_engine

    with get_engine().connect() as conn:
        return conn.execute(text(f"SELECT count(*) FROM {table} WHERE user_id = :u"), {"u": user_id}).scalar()


def _post_task(client, user, data: bytes | dict):  # type: ignore[no-untyped-def]
    if isinstance(data, dict):
        return client.post("/v1/tasks", json=data, headers=user["headers"])
    return client.post("/v1/tasks", data=data, content_type="application/json", headers=user["headers"])


HOSTILE_BODIES = {
    "deeply nested inputs": b'{"model":"echo","inputs":[' + b"[" * 5000 + b"]" * 5000 + b"]}",
    "nested object bomb": b'{"model":"echo","inputs":[1],"params":' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}",
    # Past pydantic's serializer (255 levels) but within the JSON parser's stack: it was a 500.
    "300 levels in an item": b'{"model":"echo","inputs":[' + b"[" * 300 + b"]" * 300 + b"]}",
    "300 levels under an unknown param": b'{"model":"echo","inputs":[1],"params":{"bogus":' + b"[" * 300
    + b"]" * 300 + b"}}",
    "NUL in an item": {"model": "echo", "inputs": ["ok", "bad\u0000byte"]},
    "NUL in the model": {"model": "ec\u0000ho", "inputs": [1]},
    "lone surrogate": b'{"model":"echo","inputs":["\\ud800"]}',
    "SQL in the model": {"model": "echo'; DROP TABLE tasks; --", "inputs": [1]},
    "operator object as model": {"model": {"$ne": None}, "inputs": [1]},
    "JSON smuggled in priority": {"model": "echo", "inputs": [1], "priority": "9 OR 1=1"},
    "duplicate-key trick": b'{"model":"echo","model":"generic","inputs":[1],"params":{"command":["sh"]},"extra":1}',
    "huge number": b'{"model":"echo","inputs":[1],"batch_size":1' + b"0" * 400 + b"}",
    "NaN money": b'{"model":"echo","inputs":[1],"max_cost":NaN}',
    "negative money": {"model": "echo", "inputs": [1], "max_cost": "-1"},
    "text model given objects": {"model": "embedding", "inputs": [{"text": "x"}]},
    "file model given a path": {"model": "resnet50", "inputs": ["../../etc/passwd"]},
}


@pytest.mark.parametrize("name", list(HOSTILE_BODIES))
def test_hostile_task_bodies_are_4xx_and_store_nothing(client, user, name):  # type: ignore[no-untyped-def]
    before = _count("tasks", user["id"])
    resp = _post_task(client, user, HOSTILE_BODIES[name])
    assert 400 <= resp.status_code < 500, (name, resp.status_code, resp.get_data(as_text=True)[:300])
    assert resp.content_type == "application/problem+json"
    assert resp.get_json()["detail"]
    assert _count("tasks", user["id"]) == before


@pytest.mark.parametrize(("body", "field", "words"), [
    (b'{"model":"echo","inputs":[1,' + b"[" * 65 + b"]" * 65 + b"]}", "inputs", "item 1 nests more than 64"),
    (b'{"model":"echo","inputs":[1],"params":{"x":' + b"{\"a\":" * 65 + b"1" + b"}" * 65 + b"}}", "params",
     "'x' nests more than 64"),
    (b'{"model":"echo","inputs":[' + b"[" * 5000 + b"]" * 5000 + b"]}", "body", "nested too deeply"),
])
def test_nesting_past_the_limit_names_the_field(client, user, body, field, words):  # type: ignore[no-untyped-def]
    resp = _post_task(client, user, body)
    assert resp.status_code == 422, resp.get_data(as_text=True)[:300]
    error = resp.get_json()["errors"][0]
    assert error["field"] == field and words in error["message"], error
    assert _post_task(client, user, b'{"model":"echo","inputs":[' + b"[" * 64 + b"]" * 64 + b"]}").status_code == 202


def test_too_many_inputs_is_refused_before_anything_is_stored(client, user):  # type: ignore[no-untyped-def]
    from marketplace.settings import get_settings

    limit = get_settings().max_inputs
    before = _count("tasks", user["id"])
    resp = _post_task(client, user, {"model": "echo", "inputs": [0] * (limit + 1)})
    assert resp.status_code in (413, 422), resp.status_code
    assert "inputs" in resp.get_data(as_text=True) or resp.status_code == 413
    assert _count("tasks", user["id"]) == before


def test_sql_in_query_strings_and_ids_is_harmless(client, user):  # type: ignore[no-untyped-def]
    # A well-formed cursor of the wrong types (["<time>", 123]): uuid.UUID(123) was a 500.
    forged = base64.urlsafe_b64encode(b'["2026-11-28T11:59:11+00:00", 123]').decode()
    for path in ("/v1/tasks?status=Done'%20OR%20'1'='1", "/v1/tasks?cursor=' OR 1=1 --", f"/v1/tasks?cursor={forged}",
                 "/v1/tasks/1%20OR%201=1", "/v1/tasks/' OR ''='/result", "/v1/billing/ledger?task_id=1;DROP TABLE users"):
        resp = client.get(path, headers=user["headers"])
        assert resp.status_code in (400, 404, 422), (path, resp.status_code)
    from marketplace.infra.db import get_engine

    with get_engine().connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM users")).scalar() >= 1


@pytest.mark.parametrize("filename", ["../../etc/passwd", "..\\..\\boot.ini", "/etc/shadow", "a/../../b.png",
                                      "nul\u0000byte.png", "ünïcødé ✓.png", ".", ""])
def test_file_names_cannot_steer_where_bytes_are_stored(client, user, filename):  # type: ignore[no-untyped-def]
    resp = client.post("/v1/files", data={"file": (io.BytesIO(b"payload-bytes"), filename)},
                       headers=user["headers"], content_type="multipart/form-data")
    if resp.status_code >= 400:  # refusing the name outright is fine, as long as it is a clear 4xx
        assert resp.status_code < 500 and resp.content_type == "application/problem+json"
        return
    assert resp.status_code == 201
    from marketplace.infra.db import get_engine

    with get_engine().connect() as conn:
        row = conn.execute(text("SELECT key, filename FROM files WHERE id = :i"), {"i": resp.get_json()["id"]}).one()
    assert row.key == f"inputs/{user['id']}/{resp.get_json()['sha256']}"
    assert row.filename is None or ("/" not in row.filename and "\\" not in row.filename
                                    and ".." not in row.filename and "\x00" not in row.filename)


def test_unicode_is_kept_exactly(client, user, worker):  # type: ignore[no-untyped-def]
    from tests.support.api import wait_for_task

    items = ["日本語", "emoji 🚀", "rtl \u202eevil", "zero\u200bwidth", {"ключ": "значение"}]
    resp = _post_task(client, user, {"model": "echo", "inputs": items})
    assert resp.status_code == 202
    doc = wait_for_task(client, user["headers"], resp.get_json()["id"])
    assert doc["status"] == "Done"
    assert client.get(f"/v1/tasks/{doc['id']}/result", headers=user["headers"]).get_json()["outputs"] == items

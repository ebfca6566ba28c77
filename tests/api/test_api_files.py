"""Uploads: bytes in the object store under inputs/<user>/<sha256>, usable only by their owner."""
from __future__ import annotations

import hashlib
import io
import uuid

from tests.support.api import register


def _upload(client, headers, data: bytes, name: str = "cat.jpg", ctype: str = "image/jpeg"):  # type: ignore[no-untyped-def]
    return client.post("/v1/files", data={"file": (io.BytesIO(data), name, ctype)}, headers=headers,
                       content_type="multipart/form-data")


def test_upload_stores_bytes_and_returns_metadata(client, user):  # type: ignore[no-untyped-def]
    from marketplace.infra.storage import get_store

    data = b"\xff\xd8\xff" + uuid.uuid4().bytes * 100
    resp = _upload(client, user["headers"], data, name="../../etc/passwd/../cat photo.jpg")
    assert resp.status_code == 201, resp.get_json()
    body = resp.get_json()
    assert body["size"] == len(data) and body["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["content_type"] == "image/jpeg"
    assert "/" not in body["filename"] and ".." not in body["filename"] and body["filename"].endswith(".jpg")
    assert resp.headers["Location"] == f"/v1/files/{body['id']}"
    assert get_store().get_bytes(f"inputs/{user['id']}/{body['sha256']}") == data
    meta = client.get(f"/v1/files/{body['id']}", headers=user["headers"])
    assert meta.status_code == 200 and meta.get_json()["sha256"] == body["sha256"]


def test_upload_without_file_field_is_422_and_needs_auth(client, user):  # type: ignore[no-untyped-def]
    resp = client.post("/v1/files", data={"other": "x"}, headers=user["headers"], content_type="multipart/form-data")
    assert resp.status_code == 422 and resp.get_json()["errors"][0]["field"] == "file"
    assert _upload(client, {}, b"abc").status_code == 401
    empty = _upload(client, user["headers"], b"")
    assert empty.status_code == 422


def test_file_is_private_to_its_owner(client, user, other):  # type: ignore[no-untyped-def]
    fid = _upload(client, user["headers"], b"private bytes").get_json()["id"]
    assert client.get(f"/v1/files/{fid}", headers=other["headers"]).status_code == 404
    assert client.get("/v1/files/not-a-uuid", headers=user["headers"]).status_code == 404
    # a task of another user referencing it is refused, naming the item
    resp = client.post("/v1/tasks", json={"model": "resnet50", "inputs": [{"file": fid}], "device": "cpu"},
                       headers=other["headers"])
    assert resp.status_code == 422
    assert resp.get_json()["errors"][0]["field"] == "inputs[0]" and fid in resp.get_json()["errors"][0]["message"]


def test_owner_can_reference_the_file_in_a_task(client, user):  # type: ignore[no-untyped-def]
    fid = _upload(client, user["headers"], b"image bytes").get_json()["id"]
    resp = client.post("/v1/tasks", json={"model": "resnet50", "inputs": [{"file": fid}], "device": "gpu"},
                       headers=user["headers"])
    assert resp.status_code == 202, resp.get_json()
    client.post(f"/v1/tasks/{resp.get_json()['id']}/cancel", headers=user["headers"])


def test_oversize_upload_is_413(make_app):  # type: ignore[no-untyped-def]
    c = make_app(max_body_bytes=4096).test_client()
    u = register(c)
    resp = _upload(c, u["headers"], b"x" * 10_000)
    assert resp.status_code == 413 and resp.content_type == "application/problem+json"

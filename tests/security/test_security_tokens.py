"""Token abuse against every protected operation of the API: each is a 401 problem, never data."""
from __future__ import annotations

import base64
import json
import re
import uuid
from datetime import timedelta

import jwt as pyjwt
import pytest

from tests.support.api import register


def _b64(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


@pytest.fixture()
def bad_tokens(client, app):  # type: ignore[no-untyped-def]
    from flask_jwt_extended import create_access_token

    u = register(client)
    access = u["tokens"]["access_token"]
    claims = pyjwt.decode(access, options={"verify_signature": False})
    with app.app_context():
        expired = create_access_token(identity=u["id"], expires_delta=timedelta(seconds=-5))
    revoked = client.post("/v1/auth/login", json={"email": u["email"], "password": u["password"]}).get_json()
    assert client.post("/v1/auth/logout", headers={"Authorization": f"Bearer {revoked['access_token']}"}).status_code == 204
    return {
        "alg-none": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}.",
        "wrong-key": pyjwt.encode(claims, "not-the-server-secret-0123456789abcdef", algorithm="HS256"),
        "expired": expired,
        "revoked": revoked["access_token"],
        "refresh-as-access": u["tokens"]["refresh_token"],
    }


def _protected_operations(client) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    spec = client.get("/openapi.json").get_json()
    ops = []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method not in ("get", "post", "put", "patch", "delete") or not op.get("security"):
                continue
            if path == "/v1/auth/refresh":  # takes the refresh token by design
                continue
            ops.append((method, re.sub(r"\{[^}]+\}", str(uuid.uuid4()), path)))
    return ops


def test_every_protected_operation_refuses_abused_tokens(client, bad_tokens):  # type: ignore[no-untyped-def]
    ops = _protected_operations(client)
    assert len(ops) >= 15, ops
    for kind, token in bad_tokens.items():
        for method, path in ops:
            if kind == "refresh-as-access" and path == "/v1/auth/logout":
                continue  # logout takes either token on purpose: that is how a refresh token is revoked
            resp = client.open(path, method=method.upper(), headers={"Authorization": f"Bearer {token}"}, json={})
            assert resp.status_code == 401, (kind, method, path, resp.status_code, resp.get_data(as_text=True)[:200])
            assert resp.content_type == "application/problem+json"


def test_refresh_endpoint_refuses_an_access_token(client):  # type: ignore[no-untyped-def]
    u = register(client)
    resp = client.post("/v1/auth/refresh", headers={"Authorization": f"Bearer {u['tokens']['access_token']}"})
    assert resp.status_code == 401


def test_a_token_that_worked_is_refused_once_it_expires(client, app):  # type: ignore[no-untyped-def]
    """Verified tokens are remembered between requests (api.auth): never past their expiry."""
    import time

    from flask_jwt_extended import create_access_token

    u = register(client)
    with app.app_context():
        short = create_access_token(identity=u["id"], expires_delta=timedelta(seconds=2))
    headers = {"Authorization": f"Bearer {short}"}
    assert client.get("/v1/tasks", headers=headers).status_code == 200
    assert client.get("/v1/tasks", headers=headers).status_code == 200
    time.sleep(max(0.0, pyjwt.decode(short, options={"verify_signature": False})["exp"] - time.time()) + 0.1)
    resp = client.get("/v1/tasks", headers=headers)
    assert resp.status_code == 401, resp.get_data(as_text=True)


def test_a_remembered_token_still_dies_on_logout(client):  # type: ignore[no-untyped-def]
    u = register(client)
    headers = {"Authorization": f"Bearer {u['tokens']['access_token']}"}
    assert client.get("/v1/tasks", headers=headers).status_code == 200
    assert client.post("/v1/auth/logout", headers=headers).status_code == 204
    assert client.get("/v1/tasks", headers=headers).status_code == 401

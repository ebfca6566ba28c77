"""Accounts: register, login, refresh, logout, /v1/me, token forgery and expiry, roles, `users create`."""
from __future__ import annotations

import base64
import json
import time
import uuid
from datetime import timedelta
from decimal import Decimal

import jwt as pyjwt
from click.testing import CliRunner

from tests.support.api import register


def _b64(data: dict) -> str:  # type: ignore[type-arg]
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_register_login_and_me(client):  # type: ignore[no-untyped-def]
    u = register(client)
    me = client.get("/v1/me", headers=u["headers"])
    assert me.status_code == 200
    body = me.get_json()
    assert body["id"] == u["id"] and body["email"] == u["email"] and body["role"] == "user"
    assert body["balance"] == body["available_balance"] and float(body["balance"]) > 0
    assert body["quotas"]["max_active_tasks"] > 0
    assert body["usage"]["active_tasks"] == 0 and Decimal(body["usage"]["spent_today"]) == 0
    assert len(body["webhook_secret"]) >= 32
    tokens = u["tokens"]
    assert tokens["token_type"] == "Bearer" and tokens["expires_in"] > 0 and tokens["refresh_token"]


def test_password_is_hashed_with_argon2(client, stack):  # type: ignore[no-untyped-def]
    from marketplace.infra.db import session_scope
    from marketplace.users.models import User

    u = register(client)
    with session_scope() as session:
        stored = session.get(User, uuid.UUID(u["id"])).password_hash
    assert stored.startswith("$argon2id$") and u["password"] not in stored


def test_duplicate_email_409_bad_login_401_invalid_body_422(client):  # type: ignore[no-untyped-def]
    u = register(client)
    dup = client.post("/v1/auth/register", json={"email": u["email"].upper(), "password": "another password"})
    assert dup.status_code == 409 and dup.content_type == "application/problem+json"
    bad = client.post("/v1/auth/login", json={"email": u["email"], "password": "wrong password"})
    assert bad.status_code == 401 and bad.headers["WWW-Authenticate"] == "Bearer"
    invalid = client.post("/v1/auth/register", json={"email": "not-an-email", "password": "short"})
    assert invalid.status_code == 422
    fields = {e["field"] for e in invalid.get_json()["errors"]}
    assert fields == {"email", "password"}


def test_refresh_gives_a_working_access_token_and_is_not_an_access_token(client):  # type: ignore[no-untyped-def]
    u = register(client)
    refresh = u["tokens"]["refresh_token"]
    assert client.get("/v1/me", headers=_bearer(refresh)).status_code == 401  # a refresh token is not an access token
    resp = client.post("/v1/auth/refresh", headers=_bearer(refresh))
    assert resp.status_code == 200, resp.get_json()
    new_access = resp.get_json()["access_token"]
    assert client.get("/v1/me", headers=_bearer(new_access)).get_json()["id"] == u["id"]
    # an access token cannot refresh
    assert client.post("/v1/auth/refresh", headers=u["headers"]).status_code == 401


def test_logout_revokes_the_token_in_redis(client, redis_client):  # type: ignore[no-untyped-def]
    u = register(client)
    assert client.get("/v1/me", headers=u["headers"]).status_code == 200
    assert client.post("/v1/auth/logout", headers=u["headers"]).status_code == 204
    after = client.get("/v1/me", headers=u["headers"])
    assert after.status_code == 401 and "revoked" in after.get_json()["detail"]
    # the blocklist entry expires with the token
    payload = pyjwt.decode(u["tokens"]["access_token"], options={"verify_signature": False})
    ttl = redis_client.ttl(f"marketplace:jwt:revoked:{payload['jti']}")
    assert 0 < ttl <= payload["exp"] - int(time.time()) + 2
    # Logging out ends the login: its refresh token mints no more access tokens (it did).
    refresh = u["tokens"]["refresh_token"]
    again = client.post("/v1/auth/refresh", headers=_bearer(refresh))
    assert again.status_code == 401 and "revoked" in again.get_json()["detail"]
    # Another login of the same account is another session, untouched; logging out with its
    # refresh token ends the access tokens minted from it too.
    login = {"email": u["email"], "password": u["password"]}
    second = client.post("/v1/auth/login", json=login).get_json()
    minted = client.post("/v1/auth/refresh", headers=_bearer(second["refresh_token"])).get_json()["access_token"]
    third = client.post("/v1/auth/login", json=login).get_json()
    assert client.get("/v1/me", headers=_bearer(minted)).status_code == 200
    assert client.post("/v1/auth/logout", headers=_bearer(second["refresh_token"])).status_code == 204
    for token in (second["access_token"], minted, second["refresh_token"]):
        path = "/v1/auth/refresh" if token == second["refresh_token"] else "/v1/me"
        verb = client.post if path.endswith("refresh") else client.get
        assert verb(path, headers=_bearer(token)).status_code == 401, path
    assert client.get("/v1/me", headers=_bearer(third["access_token"])).status_code == 200


def test_forged_and_expired_tokens_are_401(client, app):  # type: ignore[no-untyped-def]
    from flask_jwt_extended import create_access_token

    u = register(client)
    claims = pyjwt.decode(u["tokens"]["access_token"], options={"verify_signature": False})
    wrong_key = pyjwt.encode(claims, "not-the-server-secret-0123456789abcdef", algorithm="HS256")
    alg_none = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."
    tampered_claims = {**claims, "sub": str(uuid.uuid4())}
    original = u["tokens"]["access_token"].split(".")
    tampered = f"{original[0]}.{_b64(tampered_claims)}.{original[2]}"
    with app.app_context():
        expired = create_access_token(identity=u["id"], expires_delta=timedelta(seconds=-5))
    for token in (wrong_key, alg_none, tampered, expired, "garbage"):
        resp = client.get("/v1/me", headers=_bearer(token))
        assert resp.status_code == 401, (token, resp.get_json())
        assert resp.content_type == "application/problem+json"
    assert "expired" in client.get("/v1/me", headers=_bearer(expired)).get_json()["detail"]
    assert client.get("/v1/me").status_code == 401


def test_users_create_cli_makes_an_admin_who_sees_all_tasks(client, stack):  # type: ignore[no-untyped-def]
    from marketplace.cli.main import main

    email = f"admin-{uuid.uuid4().hex[:8]}@example.com"
    runner = CliRunner()
    out = runner.invoke(main, ["users", "create", "--email", email, "--admin"],
                        input="admin password 1\nadmin password 1\n")
    assert out.exit_code == 0, out.output
    assert "created admin" in out.output
    again = runner.invoke(main, ["users", "create", "--email", email, "--password", "whatever123"])
    assert again.exit_code != 0 and "already registered" in again.output
    mismatch = runner.invoke(main, ["users", "create", "--email", "x" + email], input="aaaaaaaa1\nbbbbbbbb2\n"
                             "cccccccc3\ncccccccc3\n")
    assert "do not match" in mismatch.output
    # The rules of a registration: REST and gRPC refused this address, the CLI created it.
    bad_email = runner.invoke(main, ["users", "create", "--email", "notanemail", "--password", "long enough 1"])
    assert bad_email.exit_code == 2 and "--email" in bad_email.output, bad_email.output
    short = runner.invoke(main, ["users", "create", "--email", "y" + email, "--password", "short"])
    assert short.exit_code == 2 and "--password" in short.output, short.output

    admin = client.post("/v1/auth/login", json={"email": email, "password": "admin password 1"}).get_json()
    admin_headers = _bearer(admin["access_token"])
    assert client.get("/v1/me", headers=admin_headers).get_json()["role"] == "admin"

    u = register(client)
    task = client.post("/v1/tasks", json={"model": "echo", "inputs": [1]}, headers=u["headers"]).get_json()
    assert client.get(f"/v1/tasks/{task['id']}", headers=admin_headers).status_code == 200
    own = client.get("/v1/tasks", headers=admin_headers).get_json()["tasks"]
    assert task["id"] not in [t["id"] for t in own]
    everyone = client.get("/v1/tasks?all=1&limit=100", headers=admin_headers).get_json()["tasks"]
    assert task["id"] in [t["id"] for t in everyone]
    # a plain user's all=1 still lists only their own
    other = register(client)
    assert client.get("/v1/tasks?all=1", headers=other["headers"]).get_json()["tasks"] == []


def test_operators_list_accounts_and_set_roles_and_quotas(client, stack):  # type: ignore[no-untyped-def]
    """Quota overrides lived on the row with nothing but SQL to set them."""
    from marketplace.cli.main import main

    u = register(client)
    runner = CliRunner()
    listed = runner.invoke(main, ["users", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    mine = next(r for r in json.loads(listed.output) if r["email"] == u["email"])
    assert mine["role"] == "user" and mine["max_active_tasks"] is None

    out = runner.invoke(main, ["users", "set", u["email"], "--max-active-tasks", "1", "--daily-spend-limit", "100.5"])
    assert out.exit_code == 0 and "max_active_tasks=1" in out.output, out.output
    quotas = client.get("/v1/me", headers=u["headers"]).get_json()["quotas"]
    assert quotas["max_active_tasks"] == 1 and Decimal(str(quotas["daily_spend_limit"])) == Decimal("100.5")
    body = {"model": "embedding", "inputs": ["x"], "device": "gpu"}  # no GPU node: stays active
    first = client.post("/v1/tasks", json=body, headers=u["headers"])
    assert first.status_code == 202, first.get_json()
    assert client.post("/v1/tasks", json=body, headers=u["headers"]).status_code == 429

    assert runner.invoke(main, ["users", "set", u["email"], "--max-active-tasks", "default", "--role", "admin"]) \
        .exit_code == 0
    me = client.get("/v1/me", headers=u["headers"]).get_json()
    assert me["role"] == "admin" and me["quotas"]["max_active_tasks"] > 1
    for args in (["--max-active-tasks", "-1"], ["--daily-spend-limit", "NaN"], ["--max-items-per-task", "many"], []):
        bad = runner.invoke(main, ["users", "set", u["email"], *args])
        assert bad.exit_code == 2, (args, bad.output)
    missing = runner.invoke(main, ["users", "set", "nobody@example.com", "--role", "user"])
    assert missing.exit_code == 1 and "no account nobody@example.com" in missing.output
    # every page (an admin reads the whole log, from its first record, whatever earlier tests wrote)
    records, cursor = [], ""
    while True:
        page = client.get(f"/v1/audit?limit=1000{cursor}", headers=u["headers"]).get_json()
        records += page["records"]
        if not page["next_cursor"]:
            break
        cursor = f"&cursor={page['next_cursor']}"
    assert [r for r in records if r["action"] == "user.updated" and r["subject"] == f"user:{me['id']}"], records[-3:]

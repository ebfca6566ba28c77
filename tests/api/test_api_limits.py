"""Rate limits (per user, per IP, on Redis) and the active-task quota, from the API side."""
from __future__ import annotations

import uuid

from tests.support.api import register


def test_user_limit_answers_429_problem_with_retry_after(make_app):  # type: ignore[no-untyped-def]
    app = make_app(rate_limit="3/minute", anonymous_rate_limit="1000/minute")
    c = app.test_client()
    u = register(c)
    answers = [c.get("/v1/me", headers=u["headers"]) for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert "Retry-After" not in answers[0].headers and answers[0].headers["X-RateLimit-Remaining"] == "2"
    resp = c.get("/v1/me", headers=u["headers"])
    assert resp.status_code == 429
    assert resp.content_type == "application/problem+json"
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    assert resp.get_json()["status"] == 429
    # the limit is per user: somebody else is not throttled
    other = register(c)
    assert c.get("/v1/me", headers=other["headers"]).status_code == 200
    # health and readiness are exempt
    assert all(c.get("/healthz").status_code == 200 for _ in range(5))


def test_limit_is_shared_across_app_instances_through_redis(make_app):  # type: ignore[no-untyped-def]
    a = make_app(rate_limit="4/minute").test_client()
    b = make_app(rate_limit="4/minute").test_client()
    u = register(a)
    assert [a.get("/v1/me", headers=u["headers"]).status_code for _ in range(2)] == [200, 200]
    assert [b.get("/v1/me", headers=u["headers"]).status_code for _ in range(2)] == [200, 200]
    assert b.get("/v1/me", headers=u["headers"]).status_code == 429
    assert a.get("/v1/me", headers=u["headers"]).status_code == 429


def test_anonymous_limit_is_per_ip(make_app):  # type: ignore[no-untyped-def]
    app = make_app(anonymous_rate_limit="2/minute")
    c = app.test_client()
    ip = {"REMOTE_ADDR": f"10.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}.7"}
    body = {"email": "nobody@example.com", "password": "x"}
    codes = [c.post("/v1/auth/login", json=body, environ_base=ip).status_code for _ in range(3)]
    assert codes == [401, 401, 429]
    assert "Retry-After" in c.post("/v1/auth/login", json=body, environ_base=ip).headers
    other_ip = {"REMOTE_ADDR": "10.251.0.9"}
    assert c.post("/v1/auth/login", json=body, environ_base=other_ip).status_code == 401


def test_active_task_quota_is_429_problem(client, stack):  # type: ignore[no-untyped-def]
    from marketplace.infra.db import session_scope
    from marketplace.users.models import User

    u = register(client)
    with session_scope() as session:
        session.get(User, uuid.UUID(u["id"])).max_active_tasks = 2
    # gpu.embedding has no worker in tests: these tasks stay active
    body = {"model": "embedding", "inputs": ["hello"], "device": "gpu"}
    assert [client.post("/v1/tasks", json=body, headers=u["headers"]).status_code for _ in range(2)] == [202, 202]
    resp = client.post("/v1/tasks", json=body, headers=u["headers"])
    assert resp.status_code == 429 and resp.content_type == "application/problem+json"
    # Its own hint, not raised to the rate limit's window (up to a minute) by flask-limiter.
    assert resp.get_json()["quota"] == "max_active_tasks" and resp.headers["Retry-After"] == "10"
    assert client.get("/v1/me", headers=u["headers"]).get_json()["usage"]["active_tasks"] == 2
    # cancelling one frees a slot
    first = client.get("/v1/tasks", headers=u["headers"]).get_json()["tasks"][0]["id"]
    assert client.post(f"/v1/tasks/{first}/cancel", headers=u["headers"]).status_code == 202
    assert client.post("/v1/tasks", json=body, headers=u["headers"]).status_code == 202


def _address() -> dict[str, str]:
    return {"REMOTE_ADDR": f"10.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250 + 1}"}


def test_signups_are_limited_per_address(make_app):  # type: ignore[no-untyped-def]
    """Each account gets signup credits: one address made 120 accounts a minute (the anonymous limit)."""
    c = make_app(signup_rate_limit="2/hour").test_client()
    ip = _address()

    def sign_up(email: str, environ: dict[str, str] = ip):  # type: ignore[no-untyped-def]
        return c.post("/v1/auth/register", json={"email": email, "password": "correct horse battery"},
                      environ_base=environ)

    assert [sign_up(f"farm-{uuid.uuid4().hex[:10]}@example.com").status_code for _ in range(2)] == [201, 201]
    refused = f"farm-{uuid.uuid4().hex[:10]}@example.com"
    resp = sign_up(refused)
    assert resp.status_code == 429 and resp.content_type == "application/problem+json"
    body = resp.get_json()
    assert body["detail"] == "rate limit exceeded: 2 per 1 hour (sign-ups per address)" and body["limit"] == "2 per 1 hour"
    assert 3500 <= int(resp.headers["Retry-After"]) <= 3600
    assert c.post("/v1/auth/login", json={"email": refused, "password": "correct horse battery"},
                  environ_base=ip).status_code == 401  # no account was made
    # Another address has a budget of its own.
    assert sign_up(f"farm-{uuid.uuid4().hex[:10]}@example.com", _address()).status_code == 201


def test_failed_logins_are_limited_per_account_whatever_the_address(make_app):  # type: ignore[no-untyped-def]
    c = make_app(login_failure_rate_limit="3/hour").test_client()
    u, other = register(c), register(c)

    def login(email: str, password: str):  # type: ignore[no-untyped-def]
        return c.post("/v1/auth/login", json={"email": email, "password": password}, environ_base=_address())

    # A correct login does not count; three wrong ones, each from another address, spend the account's budget.
    assert login(u["email"], u["password"]).status_code == 200
    assert [login(u["email"], "wrong password").status_code for _ in range(3)] == [401, 401, 401]
    resp = login(u["email"].upper(), u["password"])
    assert resp.status_code == 429 and resp.get_json()["detail"] == (
        "rate limit exceeded: 3 per 1 hour (failed logins per account)")
    assert int(resp.headers["Retry-After"]) > 0
    assert login(other["email"], other["password"]).status_code == 200


def test_behind_a_trusted_proxy_each_client_has_its_own_address_budget(make_app):  # type: ignore[no-untyped-def]
    """Behind a load balancer every request came from its address: one busy client's sign-ups
    used every client's budget. With MARKETPLACE_TRUSTED_PROXIES=1 the forwarded address counts;
    without it a client cannot pick its own by sending the header."""
    proxy = _address()

    def sign_up(c, forwarded: str):  # type: ignore[no-untyped-def]
        return c.post("/v1/auth/register", json={"email": f"p-{uuid.uuid4().hex[:10]}@example.com",
                                                 "password": "correct horse battery"},
                      environ_base=proxy, headers={"X-Forwarded-For": forwarded}).status_code

    behind = make_app(signup_rate_limit="1/hour", trusted_proxies=1).test_client()
    a, b = (_address()["REMOTE_ADDR"] for _ in range(2))
    assert [sign_up(behind, a), sign_up(behind, a), sign_up(behind, b)] == [201, 429, 201]

    proxy = _address()
    direct = make_app(signup_rate_limit="1/hour").test_client()
    assert [sign_up(direct, a), sign_up(direct, b)] == [201, 429]  # the header is not believed

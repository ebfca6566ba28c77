"""Webhooks cannot be aimed inside the cluster: a user's URL whose host is, or resolves to, a
loopback, private or link-local address (the metadata service, MinIO, Flower, /metrics) is
refused at submit (422 naming `webhook_url`) or at delivery (nothing is sent, no retry).
The test session allows private targets for everyone (its receivers listen on 127.0.0.1); these
tests switch that to `none` or `admins` in this process."""
from __future__ import annotations

import ipaddress
import socket

import pytest
from sqlalchemy import text

from tests.api.test_api_webhooks import Receiver, counting_posts
from tests.support.api import register, wait_for_task

INTERNAL = [
    "http://127.0.0.1:9808/metrics",
    "http://localhost:5555/api/workers",
    "http://LOCALHOST./hook",
    "http://flower.localhost/hook",
    "http://169.254.169.254/latest/meta-data/",  # the cloud metadata service
    "http://10.0.0.5:9000/marketplace",
    "http://192.168.1.1/",
    "http://172.16.0.1/",
    "http://100.64.0.1/",  # carrier-grade NAT, not global either
    "http://0.0.0.0:8000/",
    "http://2130706433/",  # 127.0.0.1 written as one number
    "http://0x7f.1/",
    "http://[::1]:8000/",
    "http://[::ffff:127.0.0.1]/",
    "http://[fe80::1]/",
    "http://[fd00::1]/",
]


@pytest.fixture()
def user(client):  # type: ignore[no-untyped-def]
    return register(client)


@pytest.fixture()
def public_only(monkeypatch):  # type: ignore[no-untyped-def]
    from marketplace.settings import get_settings

    monkeypatch.setattr(get_settings(), "webhook_allow_private", "none")


def _tasks(user_id: str) -> int:
    from marketplace.infra.db import get_engine

    with get_engine().connect() as conn:
        return conn.execute(text("SELECT count(*) FROM tasks WHERE user_id = :u"), {"u": user_id}).scalar()


@pytest.mark.parametrize("url", INTERNAL)
def test_a_webhook_to_an_internal_address_is_refused_at_submit_naming_the_field(  # type: ignore[no-untyped-def]
    client, user, public_only, url,
):
    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": [1], "webhook_url": url},
                       headers=user["headers"])
    assert resp.status_code == 422, resp.get_json()
    errors = resp.get_json()["errors"]
    assert [e["field"] for e in errors] == ["webhook_url"], errors
    assert "public addresses only" in errors[0]["message"], errors
    assert _tasks(user["id"]) == 0


def test_a_public_webhook_is_accepted_without_resolving_it_at_submit(client, user, public_only):  # type: ignore[no-untyped-def]
    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": [1], "device": "cpu",
                                          "webhook_url": "https://hooks.example.com/marketplace"},
                       headers=user["headers"])
    assert resp.status_code == 202, resp.get_json()


def test_a_name_that_resolves_inside_is_refused_at_delivery_and_not_retried(  # type: ignore[no-untyped-def]
    client, user, worker, monkeypatch,
):
    """A name passes the submit check (no DNS there); the delivery resolves it and sends nothing.
    This machine's hostname resolves to a loopback or private address (/etc/hosts)."""
    from marketplace.settings import get_settings
    from marketplace.webhooks import delivery as webhooks

    name = socket.gethostname()
    addresses = {info[4][0] for info in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)}
    assert addresses and not any(ipaddress.ip_address(a).is_global for a in addresses), addresses
    receiver = Receiver()
    try:
        url = receiver.url.replace("127.0.0.1", name)
        task = client.post("/v1/tasks", json={"model": "echo", "inputs": [1], "webhook_url": url},
                           headers=user["headers"]).get_json()
        assert wait_for_task(client, user["headers"], task["id"])["status"] == "Done"
        receiver.wait(1)  # the session's workers allow private targets: it was delivered there

        monkeypatch.setattr(get_settings(), "webhook_allow_private", "none")
        attempts = counting_posts(monkeypatch)
        result = webhooks.deliver.apply(args=[task["id"]]).get()  # in this process, eagerly
        assert result["ok"] is False and result["attempts"] == 1, result
        assert f"{name} resolves to" in result["error"] and "public addresses only" in result["error"], result
        assert attempts == [url]  # one try, no retries
        assert len(receiver.deliveries) == 1 and receiver.attempts == 1  # nothing more reached it
    finally:
        receiver.stop()


def test_a_host_that_does_not_resolve_is_retried(public_only):  # type: ignore[no-untyped-def]
    from marketplace.webhooks import delivery as webhooks

    ok, retry, note = webhooks.post("http://no-such-host.invalid/hook", b"{}", {}, timeout=2)
    assert (ok, retry) == (False, True) and "cannot resolve the webhook host" in note


def test_the_connection_itself_is_checked_so_a_rebound_name_gets_nothing(public_only):  # type: ignore[no-untyped-def]
    """DNS rebinding: a name that resolves publicly for the check and privately for the HTTP
    client. The session the delivery posts with checks the address it connected to, before
    sending, so even a URL that skipped the name check reaches nothing inside."""
    import requests

    from marketplace.webhooks.targets import public_session

    receiver = Receiver()
    try:
        with pytest.raises(requests.ConnectionError, match="127.0.0.1, not a public address"):
            public_session().post(receiver.url, data=b"{}", timeout=5)
        assert receiver.attempts == 0
        assert public_session(private_ok=True).post(receiver.url, data=b"{}", timeout=5).status_code == 204
        assert receiver.attempts == 1
    finally:
        receiver.stop()


def test_with_the_allowance_for_admins_only_an_admin_s_task_is_delivered_inside(  # type: ignore[no-untyped-def]
    client, user, worker, monkeypatch,
):
    """`admins` (what `marketplace standalone` sets): the delivery, too, asks who owns the task. A
    user's hook to a loopback receiver gets nothing; an admin's is delivered."""
    from marketplace.settings import get_settings
    from marketplace.webhooks import delivery as webhooks
    from tests.support.accounts import make_admin

    admin = make_admin(client)
    receiver = Receiver()
    try:
        ids = []
        for who in (user, admin):
            task = client.post("/v1/tasks", json={"model": "echo", "inputs": [1], "device": "cpu",
                                                  "webhook_url": receiver.url}, headers=who["headers"]).get_json()
            assert wait_for_task(client, who["headers"], task["id"])["status"] == "Done"
            ids.append(task["id"])
        receiver.wait(2)  # the session's workers allow private targets for every user

        monkeypatch.setattr(get_settings(), "webhook_allow_private", "admins")
        refused = webhooks.deliver.apply(args=[ids[0]]).get()  # in this process, eagerly
        assert refused["ok"] is False and refused["attempts"] == 1, refused
        assert "127.0.0.1 is not a public address" in refused["error"], refused
        assert receiver.attempts == 2
        delivered = webhooks.deliver.apply(args=[ids[1]]).get()
        assert delivered["ok"] is True, delivered
        assert receiver.attempts == 3 and receiver.deliveries[-1][0]["X-Marketplace-Delivery"] == ids[1]
    finally:
        receiver.stop()


def test_the_setting_s_old_boolean_spellings_keep_working_true_as_admins_only(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from marketplace.settings import Settings

    monkeypatch.delenv("MARKETPLACE_WEBHOOK_ALLOW_PRIVATE", raising=False)
    assert Settings().webhook_allow_private == "none"
    for spelled, meant in (("true", "admins"), (True, "admins"), ("false", "none"), (False, "none"),
                           ("admins", "admins"), ("ALL", "all")):
        assert Settings(webhook_allow_private=spelled).webhook_allow_private == meant, spelled
    monkeypatch.setenv("MARKETPLACE_WEBHOOK_ALLOW_PRIVATE", "true")
    assert Settings().webhook_allow_private == "admins"

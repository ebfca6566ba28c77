"""Webhooks: a real local HTTP server receives the signed task document; failures are retried."""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.support.api import wait_for_task


class Receiver:
    def __init__(self, fail_first: int = 0) -> None:
        self.deliveries: list[tuple[dict[str, str], bytes]] = []
        self.attempts = 0
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.attempts += 1
                if receiver.attempts <= receiver.fail_first:
                    self.send_response(503)
                    self.end_headers()
                    return
                receiver.deliveries.append((dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait(self, n: int = 1, timeout: float = 60.0) -> list[tuple[dict[str, str], bytes]]:
        deadline = time.monotonic() + timeout
        while len(self.deliveries) < n and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(self.deliveries) >= n, f"{len(self.deliveries)} deliveries after {self.attempts} attempts"
        return self.deliveries

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def counting_posts(monkeypatch) -> list[str]:  # type: ignore[no-untyped-def]
    """The URL of every delivery attempt from now on, each still made for real."""
    from marketplace.webhooks import delivery as webhooks

    attempts: list[str] = []
    real_post = webhooks.post

    def counting_post(url, body, headers, **kwargs):  # type: ignore[no-untyped-def]
        attempts.append(url)
        return real_post(url, body, headers, **kwargs)

    monkeypatch.setattr(webhooks, "post", counting_post)
    return attempts


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


def test_done_task_is_posted_signed_to_the_webhook(client, user, worker, receiver):  # type: ignore[no-untyped-def]
    from marketplace.webhooks.delivery import verify as legacy_verify
    from marketplace.webhooks.signing import check, verify

    secret = client.get("/v1/me", headers=user["headers"]).get_json()["webhook_secret"]
    task = client.post("/v1/tasks", json={"model": "echo", "inputs": [1, 2, 3], "webhook_url": receiver.url},
                       headers=user["headers"]).get_json()
    assert wait_for_task(client, user["headers"], task["id"])["status"] == "Done"
    headers, body = receiver.wait(1)[0]
    received_at = time.time()
    assert headers["X-Marketplace-Event"] == "task.completed"
    # The receiver's check: the raw body under the timestamp it came with, within 5 minutes.
    signature = headers["Marketplace-Signature"]
    assert verify(secret, body, signature)
    assert abs(check(secret, body, signature) - received_at) < 60
    assert not verify("another secret", body, signature)
    assert not verify(secret, body + b" ", signature)
    # Replayed later: the same delivery, byte for byte, six minutes on, is refused.
    assert not verify(secret, body, signature, now=received_at + 360)
    # Nor can the header be moved to a fresh time: the timestamp is under the HMAC.
    mac = signature.split("v1=")[1]
    assert not verify(secret, body, f"t={int(received_at) + 300},v1={mac}", now=received_at + 300)
    # The deprecated, timeless header is still sent (documented as such).
    legacy = headers["X-Marketplace-Signature"]
    assert legacy.startswith("sha256=") and legacy_verify(secret, body, legacy)
    doc = json.loads(body)
    assert doc["id"] == task["id"] and doc["status"] == "Done" and doc["progress"]["done"] == 1
    time.sleep(1)
    assert len(receiver.deliveries) == 1  # delivered once


def test_cancelled_task_fires_the_webhook(client, user, worker, receiver):  # type: ignore[no-untyped-def]
    task = client.post("/v1/tasks", json={"model": "embedding", "inputs": ["x"], "device": "gpu",
                                          "webhook_url": receiver.url}, headers=user["headers"]).get_json()
    assert client.post(f"/v1/tasks/{task['id']}/cancel", headers=user["headers"]).status_code == 202
    headers, body = receiver.wait(1)[0]
    assert headers["X-Marketplace-Event"] == "task.cancelled" and json.loads(body)["status"] == "Cancelled"


def test_a_task_cancelled_mid_run_is_posted_with_the_cost_it_settles_at(client, user, worker, receiver):  # type: ignore[no-untyped-def]
    """Its running subtasks finish, and are charged, after the cancel: the delivery waits for them
    (it carried the cost at the cancel, which then went up)."""
    from tests.support.wait import wait_until

    # Subtasks of 2 and 1 items at 1 s each, both running when the cancel lands: the short one's
    # end frees a pool slot for the delivery while the long one still runs.
    task = client.post("/v1/tasks", json={"model": "echo", "inputs": [1, 2, 3], "batch_size": 2,
                                          "params": {"sleep_s": 1.0}, "webhook_url": receiver.url},
                       headers=user["headers"]).get_json()
    subtasks = f"/v1/tasks/{task['id']}/subtasks"
    wait_until(lambda: [s["status"] for s in client.get(subtasks, headers=user["headers"]).get_json()["subtasks"]]
               == ["Running", "Running"], 60, "both subtasks running")
    assert client.post(f"/v1/tasks/{task['id']}/cancel", headers=user["headers"]).status_code == 202
    headers, body = receiver.wait(1)[0]
    posted = json.loads(body)
    assert posted["status"] == "Cancelled"
    assert not any(s["status"] == "Running" for s in client.get(subtasks, headers=user["headers"]).get_json()["subtasks"])
    settled = client.get(f"/v1/tasks/{task['id']}", headers=user["headers"]).get_json()
    assert posted["cost"] == settled["cost"] and Decimal(settled["cost"]) > 0, (posted["cost"], settled["cost"])
    assert posted["progress"] == settled["progress"]


def test_failing_receiver_is_retried_with_backoff(client, user, worker):  # type: ignore[no-untyped-def]
    flaky = Receiver(fail_first=2)
    try:
        task = client.post("/v1/tasks", json={"model": "echo", "inputs": ["a"], "webhook_url": flaky.url},
                           headers=user["headers"]).get_json()
        wait_for_task(client, user["headers"], task["id"])
        started = time.monotonic()
        flaky.wait(1, timeout=60)
        assert flaky.attempts == 3  # two 503s, then delivered
        assert time.monotonic() - started >= 1.0  # backoff: 1 s then 2 s between tries
    finally:
        flaky.stop()


def test_unreachable_receiver_gives_up_after_bounded_retries(client, user, monkeypatch):  # type: ignore[no-untyped-def]
    from marketplace.settings import get_settings
    from marketplace.webhooks import delivery as webhooks
    from tests.support.servers import free_port

    closed = f"http://127.0.0.1:{free_port()}/hook"
    ok, retry, note = webhooks.post(closed, b"{}", {}, timeout=2, private_ok=True)  # as the session allows
    assert (ok, retry) == (False, True) and "ConnectionError" in note

    task = client.post("/v1/tasks", json={"model": "embedding", "inputs": ["x"], "device": "gpu",
                                          "webhook_url": closed}, headers=user["headers"]).get_json()
    client.post(f"/v1/tasks/{task['id']}/cancel", headers=user["headers"])
    attempts = counting_posts(monkeypatch)
    monkeypatch.setattr(get_settings(), "webhook_max_retries", 2)
    monkeypatch.setattr(get_settings(), "webhook_retry_backoff", 0.01)
    result = webhooks.deliver.apply(args=[task["id"]])  # eager: retries run inline
    assert attempts == [closed] * 3  # the first try and two retries, then it gives up
    outcome = result.get(propagate=False)
    assert outcome["ok"] is False and outcome["attempts"] == 3, outcome
    # Ended: recovery does not send it again.
    from sqlalchemy import text

    from marketplace.infra.db import get_engine

    with get_engine().connect() as conn:
        ended = conn.execute(text("SELECT webhook_done_at FROM tasks WHERE id = :t"), {"t": task["id"]}).scalar()
    assert ended is not None

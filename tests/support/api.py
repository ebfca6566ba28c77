"""Small helpers for talking to the REST API in tests."""
from __future__ import annotations

import time
import uuid
from typing import Any


def register(client, *, email: str | None = None, password: str = "correct horse battery") -> dict[str, Any]:  # type: ignore[no-untyped-def]
    email = email or f"user-{uuid.uuid4().hex[:10]}@example.com"
    resp = client.post("/v1/auth/register", json={"email": email, "password": password})
    assert resp.status_code == 201, resp.get_json()
    tokens = client.post("/v1/auth/login", json={"email": email, "password": password}).get_json()
    return {
        "id": resp.get_json()["id"], "email": email, "password": password, "tokens": tokens,
        "headers": {"Authorization": f"Bearer {tokens['access_token']}"},
    }


def wait_for_task(client, headers, task_id: str, *, statuses=("Done", "Failed", "Cancelled"), timeout: float = 60.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    doc = None
    while time.monotonic() < deadline:
        doc = client.get(f"/v1/tasks/{task_id}", headers=headers).get_json()
        if doc["status"] in statuses:
            return doc
        time.sleep(0.1)
    raise AssertionError(f"task {task_id} did not reach {statuses} in {timeout}s; last: {doc}")


def api_app():  # type: ignore[no-untyped-def]
    """The API app in testing mode, built on the settings in force now (after a test's switch of
    database, broker or environment: its limits and tokens live there)."""
    from api import create_app
    from marketplace.settings import get_settings

    application = create_app(get_settings())
    application.config["TESTING"] = True
    return application

"""A small Python client for the REST API (requests).

    c = Client("http://127.0.0.1:8000")
    c.login("me@example.com", "secret")
    task = c.submit("echo", ["a", "b"])
    c.wait(task["id"]); print(c.result(task["id"])["outputs"])
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

FINAL = ("Done", "Failed", "Cancelled")


class ApiError(Exception):
    """A problem+json answer: `status`, `problem` (the parsed body)."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        super().__init__(f"HTTP {status}: {problem.get('detail') or problem.get('title') or problem}")


class Client:
    def __init__(self, base_url: str, token: str | None = None, *, refresh_token: str | None = None,
                 timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.refresh_token = refresh_token
        self.timeout = timeout
        self.http = requests.Session()

    def _request(self, method: str, path: str, *, retry_auth: bool = True, **kwargs: Any) -> requests.Response:
        given = kwargs.pop("headers", None) or {}
        headers = dict(given)
        if self.token and "Authorization" not in headers:
            headers["Authorization"] = f"Bearer {self.token}"
        resp = self.http.request(method, self.base_url + path, headers=headers, timeout=self.timeout, **kwargs)
        if resp.status_code == 401 and retry_auth and self.refresh_token and "Authorization" not in given:
            self.refresh()  # an expired access token: swap it once and try again
            for upload in (kwargs.get("files") or {}).values():  # the first try read them to the end
                upload[1].seek(0)
            return self._request(method, path, retry_auth=False, headers=given, **kwargs)
        if resp.status_code >= 400:
            try:
                problem = resp.json()
            except ValueError:
                problem = {"detail": resp.text[:500]}
            raise ApiError(resp.status_code, problem)
        return resp

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self._request(method, path, **kwargs)
        return resp.json() if resp.content else None

    # Accounts.
    def register(self, email: str, password: str) -> dict[str, Any]:
        return self._json("POST", "/v1/auth/register", json={"email": email, "password": password})

    def login(self, email: str, password: str) -> dict[str, Any]:
        tokens = self._json("POST", "/v1/auth/login", json={"email": email, "password": password})
        self.token, self.refresh_token = tokens["access_token"], tokens["refresh_token"]
        return tokens

    def refresh(self) -> str:
        resp = self._request("POST", "/v1/auth/refresh", retry_auth=False,
                             headers={"Authorization": f"Bearer {self.refresh_token}"})
        self.token = resp.json()["access_token"]
        return self.token

    def logout(self) -> None:
        """End this login: the access token, its refresh token and what it minted are refused after."""
        self._request("POST", "/v1/auth/logout")

    def me(self) -> dict[str, Any]:
        return self._json("GET", "/v1/me")

    # Files and tasks.
    def upload(self, path: str | Path, content_type: str | None = None) -> dict[str, Any]:
        import mimetypes

        path = Path(path)
        content_type = content_type or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        with path.open("rb") as fh:
            files = {"file": (path.name, fh, content_type)}
            return self._json("POST", "/v1/files", files=files)

    def submit(self, model: str, inputs: list[Any], *, params: dict[str, Any] | None = None, device: str = "any",
               batch_size: int | None = None, priority: int | None = None, webhook_url: str | None = None,
               max_cost: str | None = None, idempotency_key: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "inputs": inputs, "params": params or {}, "device": device}
        for key, value in (("batch_size", batch_size), ("priority", priority), ("webhook_url", webhook_url),
                           ("max_cost", max_cost)):
            if value is not None:
                body[key] = value
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._json("POST", "/v1/tasks", json=body, headers=headers)

    def list(self, *, status: str | None = None, limit: int | None = None,
             cursor: str | None = None) -> dict[str, Any]:
        params = {k: v for k, v in (("status", status), ("limit", limit), ("cursor", cursor)) if v is not None}
        return self._json("GET", "/v1/tasks", params=params)

    def get(self, task_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/tasks/{task_id}")

    def subtasks(self, task_id: str, *, status: str | None = None) -> list[dict[str, Any]]:
        """Every subtask (in `status`), fetched a page of 1,000 at a time."""
        out: list[dict[str, Any]] = []
        after = -1
        while True:
            params = {"limit": 1000, "after": after, **({"status": status} if status else {})}
            page = self._json("GET", f"/v1/tasks/{task_id}/subtasks", params=params)
            out += page["subtasks"]
            if page.get("next_after") is None:
                return out
            after = page["next_after"]

    def result(self, task_id: str, *, partial: bool = False) -> dict[str, Any]:
        """The outputs of a Done task; `partial`: what any task has (see `complete` and `missing`)."""
        params = {"partial": "true"} if partial else None
        return self._json("GET", f"/v1/tasks/{task_id}/result", params=params)

    def cancel(self, task_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/tasks/{task_id}/cancel")

    def wait(self, task_id: str, *, timeout: float = 600.0, poll: float = 0.5,
             on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until the task is final; `on_progress(doc)` sees every poll. TimeoutError past `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            doc = self.get(task_id)
            if on_progress:
                on_progress(doc)
            if doc["status"] in FINAL:
                return doc
            if time.monotonic() > deadline:
                raise TimeoutError(f"task {task_id} still {doc['status']} after {timeout}s")
            time.sleep(poll)

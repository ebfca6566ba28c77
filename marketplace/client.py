"""A small Python client for the REST API (requests).

    c = Client("http://127.0.0.1:8000")
    c.login("me@example.com", "secret")
    task = c.submit("echo", ["a", "b"])
    c.wait(task["id"]); print(c.result(task["id"])["outputs"])

    for event in c.events(task["id"]):  # live progress (Server-Sent Events)
        print(event["event"], event["data"])
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
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


class StreamUnavailable(Exception):
    """The server has no event stream to give (an older server, one at its stream limit, a dropped
    connection that does not come back): poll instead."""


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

    # Providers: nodes and earnings.
    def enroll_node(self, name: str, *, queues: list[str] | None = None) -> dict[str, Any]:
        return self._json("POST", "/v1/providers/nodes", json={"name": name, **({"queues": queues} if queues else {})})

    def nodes(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/providers/nodes")["nodes"]

    def disable_node(self, name: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/providers/nodes/{name}/disable")

    def rotate_node(self, name: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/providers/nodes/{name}/rotate")

    def earnings(self) -> dict[str, Any]:
        return self._json("GET", "/v1/providers/earnings")

    def cancel(self, task_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/tasks/{task_id}/cancel")

    def events(self, task_id: str, *, after: int | None = None, outputs: bool = False,
               reconnects: int = 5) -> Iterator[dict[str, Any]]:
        """The task's live events, `{"id", "event", "data"}` each (`status`, `subtask`, and last
        `task`, whose data is the task document), from `GET /v1/tasks/<id>/events`. A dropped
        connection is resumed after the last event seen (`Last-Event-ID`), `reconnects` times in
        a row at most. StreamUnavailable when the server has no stream (404, 405, 501, 503, or it
        cannot be reached); an ApiError for any other refusal."""
        last, failures = after, 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            params = {"outputs": "true"} if outputs else None
            try:
                resp = self._stream_request(task_id, headers=headers, params=params)
            except requests.RequestException as exc:
                failures += 1
                if failures > reconnects:
                    raise StreamUnavailable(f"no event stream: {exc}") from exc
                time.sleep(min(2.0, 0.2 * failures))
                continue
            if resp.status_code == 204:  # resumed after the end: nothing more
                return
            try:
                for event in _sse(resp):
                    failures = 0
                    if event["id"] is not None:
                        last = event["id"]
                    yield event
                    if event["event"] == "task":
                        return
            except requests.RequestException:
                pass  # dropped mid-stream: resume after `last`
            finally:
                resp.close()
            failures += 1
            if failures > reconnects:
                raise StreamUnavailable(f"the event stream of task {task_id} keeps dropping")
            time.sleep(min(2.0, 0.2 * failures))

    def _stream_request(self, task_id: str, *, headers: dict[str, str],
                        params: dict[str, str] | None) -> requests.Response:
        # A read timeout well past the server's heartbeat (15 s): silence that long is a dead connection.
        def send() -> requests.Response:
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            return self.http.get(f"{self.base_url}/v1/tasks/{task_id}/events", headers=headers, params=params,
                                 stream=True, timeout=(self.timeout, 60.0))

        resp = send()
        if resp.status_code == 401 and self.refresh_token:
            resp.close()
            self.refresh()
            resp = send()
        if resp.status_code in (404, 405, 501, 503):
            resp.close()
            raise StreamUnavailable(f"no event stream (HTTP {resp.status_code})")
        if resp.status_code >= 400:
            try:
                problem = resp.json()
            except ValueError:
                problem = {"detail": resp.text[:500]}
            raise ApiError(resp.status_code, problem)
        return resp

    def wait(self, task_id: str, *, timeout: float = 600.0, poll: float = 0.5,
             on_progress: Callable[[dict[str, Any]], None] | None = None, stream: bool = True) -> dict[str, Any]:
        """Follow the task to a final status and return its document: on its event stream, or by
        polling every `poll` seconds where the server has none (or `stream=False`).
        `on_progress(doc)` sees each change (`status` and `progress` at least). TimeoutError past `timeout`."""
        deadline = time.monotonic() + timeout
        if stream:
            try:
                return self._wait_on_stream(task_id, deadline=deadline, timeout=timeout, on_progress=on_progress)
            except StreamUnavailable:
                pass
        while True:
            doc = self.get(task_id)
            if on_progress:
                on_progress(doc)
            if doc["status"] in FINAL:
                return doc
            if time.monotonic() > deadline:
                raise TimeoutError(f"task {task_id} still {doc['status']} after {timeout}s")
            time.sleep(poll)

    def _wait_on_stream(self, task_id: str, *, deadline: float, timeout: float,
                        on_progress: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
        doc: dict[str, Any] = {"id": task_id, "status": "Created", "progress": {"done": 0, "failed": 0, "total": 0}}
        for event in self.events(task_id):
            data = event["data"]
            if event["event"] == "task":
                doc = data
            elif event["event"] == "status":
                doc["status"] = data["status"]
                doc["progress"]["total"] = data.get("subtasks", doc["progress"]["total"])
            elif event["event"] == "subtask" and data.get("status") in ("Done", "Failed"):
                doc["progress"]["done" if data["status"] == "Done" else "failed"] += 1
            if on_progress and event["event"] != "comment":
                on_progress(doc)
            if doc["status"] in FINAL and event["event"] == "task":
                return doc
            if time.monotonic() > deadline:
                raise TimeoutError(f"task {task_id} still {doc['status']} after {timeout}s")
        raise StreamUnavailable(f"the event stream of task {task_id} ended without its document")


def _sse(resp: requests.Response) -> Iterator[dict[str, Any]]:
    """Server-Sent Events from a streamed response: `{"id", "event", "data"}` each (data parsed as
    JSON), and `{"event": "comment"}` for each keep-alive line (a caller's chance to look at its clock)."""
    buffer = b""
    fields: dict[str, str] = {}
    data: list[str] = []
    for chunk in resp.iter_content(chunk_size=None):  # as the chunks arrive, not in 512-byte blocks
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8").rstrip("\r")
            if not line:
                if data:
                    event_id = fields.get("id")
                    yield {"id": int(event_id) if event_id and event_id.isdigit() else None,
                           "event": fields.get("event", "message"), "data": json.loads("\n".join(data))}
                fields, data = {}, []
            elif line.startswith(":"):
                yield {"id": None, "event": "comment", "data": line[1:].strip()}
            else:
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "data":
                    data.append(value)
                elif name in ("id", "event"):
                    fields[name] = value

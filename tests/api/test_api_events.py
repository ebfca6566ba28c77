"""Live progress: `GET /v1/tasks/<id>/events` (Server-Sent Events) on a live gunicorn, with a real
worker running the jobs; the Python client and `marketplace submit --wait` following it."""
from __future__ import annotations

import http.server
import json
import threading
import uuid
from collections.abc import Iterator

import pytest
import requests
from click.testing import CliRunner

from marketplace.cli.main import main
from marketplace.client import Client

ITEMS = [f"item-{i}" for i in range(25)]  # one item a subtask: 25 subtasks


@pytest.fixture()
def me(live_api) -> Client:  # type: ignore[no-untyped-def]
    client = Client(live_api)
    email, password = f"sse-{uuid.uuid4().hex[:8]}@example.com", "sse password 123"
    client.register(email, password)
    client.login(email, password)
    return client


def _events(client: Client, task_id: str, **kw) -> list[dict]:  # type: ignore[no-untyped-def]
    return [e for e in client.events(task_id, **kw) if e["event"] != "comment"]


def test_a_25_subtask_job_streams_each_subtask_then_its_document(me, worker) -> None:  # type: ignore[no-untyped-def]
    task = me.submit("echo", ITEMS, batch_size=1)
    assert task["subtasks"] == 25
    events = _events(me, task["id"], outputs=True)

    ids = [e["id"] for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), ids
    statuses = [e["data"]["status"] for e in events if e["event"] == "status"]
    assert statuses == ["Created", "Scheduled", "InProgress"], statuses
    subtasks = [e["data"] for e in events if e["event"] == "subtask"]
    assert len(subtasks) == 25
    assert sorted(s["index"] for s in subtasks) == list(range(25))
    assert all(s["status"] == "Done" and s["task_id"] == task["id"] for s in subtasks)
    assert {s["index"]: s["outputs"] for s in subtasks} == {i: [f"item-{i}"] for i in range(25)}
    assert "result_key" not in subtasks[0] and "user_id" not in subtasks[0]  # storage details stay inside

    last = events[-1]
    assert last["event"] == "task" and [e["event"] for e in events].count("task") == 1
    assert last["data"] == me.get(task["id"])  # the document GET /v1/tasks/<id> gives
    assert last["data"]["status"] == "Done" and last["data"]["progress"] == {"done": 25, "failed": 0, "total": 25}


def test_a_stream_resumed_from_last_event_id_repeats_nothing_and_misses_nothing(me, worker) -> None:  # type: ignore[no-untyped-def]
    task = me.submit("echo", ITEMS, batch_size=1)
    first: list[dict] = []
    for event in me.events(task["id"]):
        if event["event"] != "comment":
            first.append(event)
        if sum(e["event"] == "subtask" for e in first) == 5:
            break  # the client goes away after five subtasks
    rest = _events(me, task["id"], after=first[-1]["id"])
    both = first + rest
    ids = [e["id"] for e in both]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), ids
    assert sorted(e["data"]["index"] for e in both if e["event"] == "subtask") == list(range(25))
    assert [e["event"] for e in both].count("task") == 1 and both[-1]["data"]["status"] == "Done"
    # Resumed after its last event, an ended stream has nothing: 204, which stops an EventSource.
    resp = requests.get(f"{me.base_url}/v1/tasks/{task['id']}/events",
                        headers={"Authorization": f"Bearer {me.token}", "Last-Event-ID": str(ids[-1])}, timeout=30)
    assert resp.status_code == 204 and resp.content == b""
    # From the start again: the same events, the same ids (the `?last_event_id=` spelling too).
    again = _events(me, task["id"])
    assert [e["id"] for e in again] == ids
    resp = requests.get(f"{me.base_url}/v1/tasks/{task['id']}/events", params={"last_event_id": ids[-2]},
                        headers={"Authorization": f"Bearer {me.token}"}, timeout=30)
    assert resp.status_code == 200 and resp.text.count("event: task\n") == 1 and "event: subtask" not in resp.text


def test_another_users_stream_is_404_and_no_token_is_401(me, live_api, worker) -> None:  # type: ignore[no-untyped-def]
    task = me.submit("echo", ["x"])
    stranger = Client(live_api)
    email = f"other-{uuid.uuid4().hex[:8]}@example.com"
    stranger.register(email, "other password 1")
    stranger.login(email, "other password 1")
    resp = requests.get(f"{live_api}/v1/tasks/{task['id']}/events",
                        headers={"Authorization": f"Bearer {stranger.token}"}, timeout=30)
    assert resp.status_code == 404 and resp.headers["Content-Type"] == "application/problem+json"
    assert requests.get(f"{live_api}/v1/tasks/{task['id']}/events", timeout=30).status_code == 401
    bad = requests.get(f"{live_api}/v1/tasks/{task['id']}/events",
                       headers={"Authorization": f"Bearer {me.token}", "Last-Event-ID": "yesterday"}, timeout=30)
    assert bad.status_code == 422 and "Last-Event-ID" in bad.text


@pytest.fixture()
def requests_made(monkeypatch) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    """(method, path) of each request this process sends (the client's, the CLI's)."""
    from urllib.parse import urlsplit

    made: list[tuple[str, str]] = []
    send = requests.Session.send

    def recording(self, request, **kw):  # type: ignore[no-untyped-def]
        made.append((request.method, urlsplit(request.url).path))
        return send(self, request, **kw)

    monkeypatch.setattr(requests.Session, "send", recording)
    return made


def test_submit_wait_follows_the_stream(live_api, me, worker, tmp_path, monkeypatch, requests_made) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MARKETPLACE_CONFIG_DIR", str(tmp_path / "cfg"))
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "credentials.json").write_text(json.dumps({
        "url": live_api, "access_token": me.token, "refresh_token": me.refresh_token}))
    out = CliRunner().invoke(main, ["submit", "-m", "echo", "-i", "a", "-i", "b", "-i", "c", "--batch-size", "1",
                                    "--wait"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert result["outputs"] == ["a", "b", "c"] and "3/3" in out.stderr
    task = result["task_id"]
    assert requests_made == [("POST", "/v1/tasks"), ("GET", f"/v1/tasks/{task}/events"),
                             ("GET", f"/v1/tasks/{task}/result")]  # no polls


class _NoStreams(http.server.BaseHTTPRequestHandler):
    """An API without the events route (an older server): 404 there, everything else passed on."""

    upstream = ""

    def _forward(self) -> None:
        if self.path.split("?")[0].endswith("/events"):
            self.send_response(404)
            self.send_header("Content-Type", "application/problem+json")
            self.end_headers()
            self.wfile.write(b'{"type":"about:blank","title":"Not Found","status":404,"detail":"no such route"}')
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
        resp = requests.request(self.command, self.upstream + self.path, data=body, headers=headers, timeout=30)
        self.send_response(resp.status_code)
        for key in ("Content-Type", "Location"):
            if key in resp.headers:
                self.send_header(key, resp.headers[key])
        self.send_header("Content-Length", str(len(resp.content)))
        self.end_headers()
        self.wfile.write(resp.content)

    do_GET = do_POST = _forward

    def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
        pass


@pytest.fixture()
def api_without_streams(live_api) -> Iterator[str]:  # type: ignore[no-untyped-def]
    handler = type("Handler", (_NoStreams,), {"upstream": live_api})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_wait_falls_back_to_polling_where_there_is_no_stream(me, api_without_streams, worker,  # type: ignore[no-untyped-def]
                                                             requests_made) -> None:
    client = Client(api_without_streams, me.token)
    task = client.submit("echo", ["p", "q"], batch_size=1)
    seen: list[str] = []
    doc = client.wait(task["id"], poll=0.1, on_progress=lambda d: seen.append(d["status"]))
    assert doc["status"] == "Done" and doc["progress"]["done"] == 2 and seen[-1] == "Done"
    mine = [r for r in requests_made if r[1].startswith(f"/v1/tasks/{task['id']}")]
    assert mine[0] == ("GET", f"/v1/tasks/{task['id']}/events")
    assert set(mine[1:]) == {("GET", f"/v1/tasks/{task['id']}")}  # then polls

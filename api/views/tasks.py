"""Tasks: submit, list, look up, subtasks, result, cancel, live events."""
from __future__ import annotations

import select
import socket
from collections.abc import Callable

from flask import Blueprint, Response, jsonify, request
from flask_jwt_extended import jwt_required

from api.auth import me
from api.db import db
from api.errors import problem
from api.openapi import api_doc
from api.schemas import EventsQuery, ResultQuery, SubTaskQuery, TaskAccepted, TaskListQuery
from api.validation import parse_body, parse_query
from marketplace.events.feed import TooManyStreams
from marketplace.infra.errors import InvalidInput
from marketplace.results import service as results
from marketplace.settings import get_settings
from marketplace.tasks import listing, progress
from marketplace.tasks import service as tasks
from marketplace.tasks.schemas import SubTaskList, TaskOut, TaskPage, TaskRequest, TaskResult

bp = Blueprint("tasks", __name__, url_prefix="/v1/tasks")


@bp.post("")
@api_doc(summary="Submit a task", request=TaskRequest, responses={202: TaskAccepted, 200: TaskAccepted},
         headers={"Idempotency-Key": "Same key and body: the same task (200); another body: 409"},
         description="402 when the balance cannot cover the estimate, 409 on an Idempotency-Key reused with "
                     "another body, 429 when the active-task quota is reached.", tags=["tasks"])
@jwt_required()
def submit():  # type: ignore[no-untyped-def]
    body = parse_body(TaskRequest)
    user = me()
    key = request.headers.get("Idempotency-Key")
    session = db()
    task, created = tasks.submit_task(session, user_id=user.id, request=body, idempotency_key=key)
    session.commit()  # its schedule message goes once this commits
    # Everything the acceptance needs is on the row: no progress or cost queries on the hot path.
    links = tasks.task_links(task.id)
    resp = jsonify({
        "id": str(task.id), "status": task.status, "model": task.model, "subtasks": task.subtask_count,
        "redundancy": task.redundancy, "estimated_cost": str(task.estimated_cost), "links": links,
    })
    resp.status_code = 202 if created else 200
    resp.headers["Location"] = links["self"]
    return resp


@bp.get("")
@api_doc(summary="The caller's tasks, newest first (admins: `all=1` for everyone's)", query=TaskListQuery,
         responses={200: TaskPage}, tags=["tasks"])
@jwt_required()
def index():  # type: ignore[no-untyped-def]
    q = parse_query(TaskListQuery)
    docs, cursor = listing.list_tasks(db(), user=me(), status=q.status, limit=q.limit, cursor=q.cursor,
                                        all_users=q.all == "1")
    return jsonify(TaskPage(tasks=docs, next_cursor=cursor).model_dump(mode="json"))


@bp.get("/<task_id>")
@api_doc(summary="A task's status, progress and cost", responses={200: TaskOut}, tags=["tasks"])
@jwt_required()
def get(task_id: str):  # type: ignore[no-untyped-def]
    session = db()
    task = tasks.get_task(session, task_id=task_id, user=me())
    return jsonify(tasks.describe_task(session, task=task).model_dump(mode="json"))


@bp.get("/<task_id>/subtasks")
@api_doc(summary="A task's subtasks, in index order (paged with `limit` and `after`)", query=SubTaskQuery,
         responses={200: SubTaskList}, tags=["tasks"])
@jwt_required()
def subtasks(task_id: str):  # type: ignore[no-untyped-def]
    q = parse_query(SubTaskQuery)
    session = db()
    task = tasks.get_task(session, task_id=task_id, user=me())
    doc = tasks.subtask_page(session, task=task, status=q.status, after=q.after, limit=q.limit)
    return jsonify(doc.model_dump(mode="json"))


@bp.get("/<task_id>/result")
@api_doc(summary="Outputs in input order (409 until Done; `partial=true`: what there is, at any status)",
         query=ResultQuery, responses={200: TaskResult}, tags=["tasks"])
@jwt_required()
def result(task_id: str):  # type: ignore[no-untyped-def]
    partial = parse_query(ResultQuery).partial
    session = db()
    task = tasks.get_task(session, task_id=task_id, user=me())
    # The stored document already has the response shape; stream it as is.
    body = results.read_partial_result(session, task=task) if partial else results.read_result(session, task=task)
    return Response(body, mimetype="application/json")


@bp.post("/<task_id>/cancel")
@api_doc(summary="Cancel an active task (idempotent; 409 once Done or Failed)", responses={202: TaskOut},
         tags=["tasks"])
@jwt_required()
def cancel(task_id: str):  # type: ignore[no-untyped-def]
    session = db()
    task = listing.cancel_task(session, task_id=task_id, user=me())
    session.commit()
    resp = jsonify(tasks.describe_task(session, task=task).model_dump(mode="json"))
    resp.status_code = 202
    return resp


EVENT_STREAM = {
    "x-media-type": "text/event-stream",
    "type": "string",
    "description": (
        "Server-Sent Events, each with an increasing `id`: `status` (data: the new status, `Created`, "
        "`Scheduled` or `InProgress`, and the move's details), `subtask` (a subtask ended: index, status, "
        "items, seconds, worker, attempts, error, and `outputs` with `outputs=true`), then `task` (data: "
        "the task document of `GET /v1/tasks/{task_id}`, at its final status and settled cost), after "
        "which the stream ends. Comment lines every ~15 s keep a quiet stream open."),
}


@bp.get("/<task_id>/events")
@api_doc(summary="Live progress: the task's events as Server-Sent Events, ending with its document",
         query=EventsQuery, responses={200: EVENT_STREAM, 204: None},
         headers={"Last-Event-ID": "Resume after this event id (sent by EventSource on reconnect)"},
         description="Owner or admin (another user's task is 404). 204 when a stream that ended is "
                     "resumed after its last event (EventSource then stops reconnecting); 503 with "
                     "Retry-After when this server holds as many open streams as it may (poll "
                     "`GET /v1/tasks/{task_id}` meanwhile).", tags=["tasks"])
@jwt_required()
def events(task_id: str):  # type: ignore[no-untyped-def]
    q = parse_query(EventsQuery)
    after = _last_event_id(q.last_event_id)
    task = tasks.get_task(db(), task_id=task_id, user=me())
    final = task.status in ("Done", "Failed", "Cancelled")
    if final and after and not progress.has_events_after(task_id=task.id, after=after):
        return Response(status=204)
    try:
        sub = progress.open_stream(task_id=task.id)
    except TooManyStreams as exc:
        resp = problem(503, "Service unavailable", f"{exc}; poll the task meanwhile")
        resp.headers["Retry-After"] = "5"
        return resp
    body = progress.stream(task_id=task.id, sub=sub, after=after, outputs=q.outputs,
                           heartbeat=get_settings().event_stream_heartbeat,
                           gone=_hung_up(request.environ.get("gunicorn.socket")))
    # Not `stream_with_context`: the request's session closes now, the stream holds no connection.
    resp = Response(body, mimetype="text/event-stream")
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Accel-Buffering"] = "no"  # nginx: pass each event on as it comes
    return resp


def _last_event_id(given: int | None) -> int:
    raw = request.headers.get("Last-Event-ID")
    if raw is None or not raw.strip():
        return given or 0
    try:
        value = int(raw.strip())
    except ValueError:
        raise InvalidInput.field("Last-Event-ID", "an event id this stream sent (an integer)") from None
    if value < 0:
        raise InvalidInput.field("Last-Event-ID", "an event id this stream sent (an integer)")
    return value


def _hung_up(sock: socket.socket | None) -> Callable[[], bool]:
    """Whether the client closed the connection (gunicorn gives its socket; other servers: never)."""
    def gone() -> bool:
        if sock is None:
            return False
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable) and sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    return gone

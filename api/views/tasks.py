"""Tasks: submit, look up, subtasks, result."""
from __future__ import annotations

from flask import Blueprint, Response, jsonify, request
from flask_jwt_extended import jwt_required

from api.auth import me
from api.db import db
from api.validation import parse_body
from marketplace.tasks import service as tasks
from marketplace.tasks.schemas import SubTaskList, TaskRequest

bp = Blueprint("tasks", __name__, url_prefix="/v1/tasks")


def _current_trace_id() -> str | None:
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


@bp.post("")
@jwt_required()
def submit():  # type: ignore[no-untyped-def]
    body = parse_body(TaskRequest)
    user = me()
    key = request.headers.get("Idempotency-Key") or None
    session = db()
    task, created = tasks.create_task(
        session, user_id=user.id, request=body, idempotency_key=key, trace_id=_current_trace_id()
    )
    session.commit()
    if created:
        tasks.enqueue_schedule(task.id)
    doc = tasks.describe_task(session, task=task)
    resp = jsonify({
        "id": doc.id, "status": doc.status, "model": doc.model, "subtasks": doc.subtasks,
        "estimated_cost": doc.estimated_cost, "links": doc.links,
    })
    resp.status_code = 202 if created else 200
    resp.headers["Location"] = doc.links["self"]
    return resp


@bp.get("/<task_id>")
@jwt_required()
def get(task_id: str):  # type: ignore[no-untyped-def]
    session = db()
    task = tasks.get_task(session, task_id=task_id, user=me())
    return jsonify(tasks.describe_task(session, task=task).model_dump(mode="json"))


@bp.get("/<task_id>/subtasks")
@jwt_required()
def subtasks(task_id: str):  # type: ignore[no-untyped-def]
    session = db()
    task = tasks.get_task(session, task_id=task_id, user=me())
    doc = SubTaskList(task_id=str(task.id), subtasks=tasks.list_subtasks(session, task=task))
    return jsonify(doc.model_dump(mode="json"))


@bp.get("/<task_id>/result")
@jwt_required()
def result(task_id: str):  # type: ignore[no-untyped-def]
    session = db()
    task = tasks.get_task(session, task_id=task_id, user=me())
    # The stored document already has the response shape; stream it as is.
    return Response(tasks.read_result(session, task=task), mimetype="application/json")

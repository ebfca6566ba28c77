"""TaskService over gRPC: a thin adapter over `marketplace.tasks.service`."""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select

from marketplace.billing import service as billing
from marketplace.infra import errors
from marketplace.pb.task import task_pb2, task_pb2_grpc
from marketplace.rpc.calls import Call, message, money, parse_json, rpc, rpc_stream, timestamp, validation_error
from marketplace.tasks import listing
from marketplace.tasks import service as tasks
from marketplace.tasks.models import SubTaskStatus, Task, TaskStatus
from marketplace.tasks.schemas import MAX_SUBTASK_PAGE, SubTaskOut, TaskOut, TaskRequest
from marketplace.tasks.storable import check_storable

WATCH_POLL_SECONDS = 0.25
DEFAULT_PAGE, MAX_PAGE = 20, 100  # as REST GET /v1/tasks
SUBTASK_STATUSES = [s.value for s in SubTaskStatus]


def task_message(task: Task, doc: TaskOut) -> task_pb2.Task:
    return message(
        task_pb2.Task,
        id=doc.id, status=doc.status, model=doc.model, device=doc.device,
        progress=task_pb2.Progress(done=doc.progress.done, failed=doc.progress.failed, total=doc.progress.total),
        cost=money(task.cost), estimated_cost=doc.estimated_cost,
        created_at=timestamp(doc.created_at), started_at=timestamp(doc.started_at),
        finished_at=timestamp(doc.finished_at), scheduled_at=timestamp(doc.scheduled_at),
        error=doc.error or "", status_reason=doc.status_reason or "", queue_position=doc.queue_position or 0,
        trace_id=doc.trace_id or "",
        user_id=str(task.user_id), queue=doc.queue or "", priority=doc.priority, batch_size=task.batch_size,
        subtask_count=task.subtask_count, redundancy=task.redundancy or 1,
    )


def subtask_message(sub: SubTaskOut) -> task_pb2.SubTask:
    return message(
        task_pb2.SubTask,
        id=sub.id, index=sub.index, status=sub.status, worker=sub.worker or "", attempts=sub.attempts,
        seconds=sub.seconds or 0.0, items=sub.items, error=sub.error or "",
        started_at=timestamp(sub.started_at), finished_at=timestamp(sub.finished_at),
        replicas=[task_pb2.Replica(
            id=r.id, replica=r.replica, status=r.status, node=r.node or "", provider=r.provider or "",
            output_sha256=r.output_sha256 or "", platform_paid=r.platform_paid,
            verdict="" if r.agreed is None else ("agreed" if r.agreed else "disagreed"),
        ) for r in sub.replicas or []],
    )


def task_request(request: task_pb2.CreateTaskRequest) -> TaskRequest:
    """The proto request as the REST body model, so both transports validate alike."""
    body: dict[str, Any] = {
        "model": request.model,
        "inputs": [parse_json(item, field=f"inputs[{i}]") for i, item in enumerate(request.inputs)],
        "params": parse_json(request.params_json, field="params_json", default={}),
        "device": request.device or "any",
        "priority": request.priority,
    }
    if request.batch_size:
        body["batch_size"] = request.batch_size
    if request.webhook_url:
        body["webhook_url"] = request.webhook_url
    if request.max_cost:
        body["max_cost"] = request.max_cost
    if request.redundancy:
        body["redundancy"] = request.redundancy
    check_storable(body)  # json.loads takes NaN and "\u0000", which the INSERT refused (INTERNAL)
    try:
        return TaskRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


class TaskServicer(task_pb2_grpc.TaskServiceServicer):
    def _describe(self, call: Call, task: Task) -> task_pb2.Task:
        return task_message(task, tasks.describe_task(call.session, task=task))

    @rpc()
    def CreateTask(self, request: task_pb2.CreateTaskRequest, call: Call) -> task_pb2.CreateTaskResponse:
        body = task_request(request)
        task, created = tasks.submit_task(call.session, user_id=call.me.id, request=body,
                                          idempotency_key=request.idempotency_key or None)
        call.session.commit()  # its schedule message goes once this commits
        return task_pb2.CreateTaskResponse(task=self._describe(call, task), idempotent_replay=not created)

    @rpc()
    def GetTask(self, request: task_pb2.GetTaskRequest, call: Call) -> task_pb2.GetTaskResponse:
        task = tasks.get_task(call.session, task_id=request.task_id, user=call.me)
        return task_pb2.GetTaskResponse(task=self._describe(call, task))

    @rpc()
    def ListTasks(self, request: task_pb2.ListTasksRequest, call: Call) -> task_pb2.ListTasksResponse:
        if request.status and request.status not in {s.value for s in TaskStatus}:
            raise errors.InvalidInput.field("status", f"one of {', '.join(s.value for s in TaskStatus)}")
        if not 0 <= request.limit <= MAX_PAGE:
            raise errors.InvalidInput.field("limit", f"between 1 and {MAX_PAGE} (0 for the default)")
        docs, cursor = listing.list_tasks(call.session, user=call.me, status=request.status or None,
                                            limit=request.limit or DEFAULT_PAGE, cursor=request.cursor or None)
        rows = {str(t.id): t for t in call.session.scalars(select(Task).where(Task.id.in_([d.id for d in docs])))}
        return task_pb2.ListTasksResponse(tasks=[task_message(rows[d.id], d) for d in docs], next_cursor=cursor or "")

    @rpc()
    def CancelTask(self, request: task_pb2.CancelTaskRequest, call: Call) -> task_pb2.CancelTaskResponse:
        task = listing.cancel_task(call.session, task_id=request.task_id, user=call.me)
        call.session.commit()
        return task_pb2.CancelTaskResponse(task=self._describe(call, task))

    @rpc_stream()
    def WatchTask(self, request: task_pb2.WatchTaskRequest, call: Call) -> Iterator[task_pb2.WatchTaskResponse]:
        """The document now, then on each change of status, progress or cost, until a final status
        with nothing left to settle (at most billing's SETTLE_WAIT_SECONDS past it): a cancelled task's
        running subtasks finish and are charged afterwards, so the first Cancelled document's
        cost was not the one the task settled at."""
        last, final_since = None, None
        while call.context.is_active():
            task = tasks.get_task(call.session, task_id=request.task_id, user=call.me)
            done = False
            if TaskStatus(task.status).final:
                final_since = final_since or time.monotonic()
                done = (time.monotonic() - final_since > billing.SETTLE_WAIT_SECONDS
                        or not billing.still_settling(call.session, task_id=task.id))
                if done:
                    # Read again, after the check: each statement sees the commits before it (READ
                    # COMMITTED), and a charge settled between the row's read and the check was missed.
                    call.session.expire(task)
            doc = self._describe(call, task)
            state = (doc.status, doc.progress.done, doc.progress.failed, doc.progress.total, doc.cost)
            if state != last:
                last = state
                yield task_pb2.WatchTaskResponse(task=doc)
            if done:
                return
            call.session.rollback()  # end the transaction so the next poll sees new commits
            time.sleep(WATCH_POLL_SECONDS)

    @rpc()
    def GetSubTasks(self, request: task_pb2.GetSubTasksRequest, call: Call) -> task_pb2.GetSubTasksResponse:
        if request.status and request.status not in SUBTASK_STATUSES:
            raise errors.InvalidInput.field("status", f"one of {', '.join(SUBTASK_STATUSES)}")
        if request.limit < 0 or request.limit > MAX_SUBTASK_PAGE:
            raise errors.InvalidInput.field("limit", f"0 (all) to {MAX_SUBTASK_PAGE}")
        if request.HasField("after") and request.after < -1:
            raise errors.InvalidInput.field("after", "-1 or more (a previous page's next_after)")
        task = tasks.get_task(call.session, task_id=request.task_id, user=call.me)
        page = tasks.subtask_page(call.session, task=task, status=request.status or None,
                                  after=request.after if request.HasField("after") else -1, limit=request.limit or None)
        return task_pb2.GetSubTasksResponse(task_id=str(task.id), subtasks=[subtask_message(s) for s in page.subtasks],
                                            next_after=page.next_after)

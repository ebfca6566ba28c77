"""SchedulerService over gRPC: a thin adapter over `marketplace.scheduling.service`."""
from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy import func, select

from marketplace.catalog import CONTROL_QUEUES, get_catalog
from marketplace.infra import errors
from marketplace.infra.broker import queue_depths
from marketplace.infra.db import utcnow
from marketplace.pb.scheduler import scheduler_pb2, scheduler_pb2_grpc
from marketplace.rpc.calls import Call, rpc
from marketplace.scheduling import service as scheduling
from marketplace.tasks import service as tasks
from marketplace.tasks.models import SubTask, TaskStatus

RESCHEDULE_IDLE_SECONDS = 30.0  # an owner's Reschedule re-sends a task that has not moved this long


def _idle_seconds(session: Any, task: Any) -> float:
    """Seconds since the task last moved: dispatched, or a subtask started or finished."""
    moved = session.scalar(select(func.max(func.greatest(SubTask.started_at, SubTask.finished_at)))
                           .where(SubTask.task_id == task.id))
    last = max(t for t in (task.progress_at, moved) if t is not None)
    return (utcnow() - last).total_seconds()


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    @rpc()
    def Schedule(self, request: scheduler_pb2.ScheduleRequest, call: Call) -> scheduler_pb2.ScheduleResponse:
        task = tasks.get_task(call.session, task_id=request.task_id, user=call.me)
        task_id = str(task.id)
        call.session.rollback()  # the scheduler locks the row in its own transaction
        outcome = scheduling.schedule_task(task_id)
        task = tasks.get_task(call.session, task_id=task_id)
        if outcome.status == "noop":
            raise errors.Conflict(f"task {task_id} is {task.status}; only Created tasks can be scheduled",
                                  task_status=task.status)
        return scheduler_pb2.ScheduleResponse(
            task_id=task_id, status=task.status, queue=task.queue or "", subtask_count=task.subtask_count,
            status_reason=task.status_reason or task.error or outcome.reason or "",
        )

    @rpc()
    def Reschedule(self, request: scheduler_pb2.RescheduleRequest, call: Call) -> scheduler_pb2.RescheduleResponse:
        task = tasks.get_task(call.session, task_id=request.task_id, user=call.me)
        task_id = str(task.id)
        if TaskStatus(task.status).final:
            raise errors.Conflict(f"task {task_id} is {task.status}; nothing to re-dispatch", task_status=task.status)
        if not call.me.is_admin and task.status != TaskStatus.CREATED.value:
            # Each call queued every open subtask again: an owner calling in a loop filled the queue
            # with copies (skipped when they come up, but in the way of everyone's work).
            idle = _idle_seconds(call.session, task)
            if idle < RESCHEDULE_IDLE_SECONDS:
                raise errors.Conflict(
                    f"task {task_id} moved {idle:.0f} s ago; it can be re-dispatched once it has not moved for "
                    f"{RESCHEDULE_IDLE_SECONDS:.0f} s (recovery does so by itself)", task_status=task.status)
        call.session.rollback()
        indexes = scheduling.reschedule(task_id)
        task = tasks.get_task(call.session, task_id=task_id)
        return scheduler_pb2.RescheduleResponse(task_id=task_id, status=task.status, redispatched_indexes=indexes)

    @rpc()
    def QueueStats(self, request: scheduler_pb2.QueueStatsRequest, call: Call) -> scheduler_pb2.QueueStatsResponse:
        from marketplace.infra.redis_client import get_redis
        from marketplace.registry.service import live_workers

        known = list(CONTROL_QUEUES) + get_catalog().queues
        names = list(dict.fromkeys(request.queues)) or known
        unknown = [q for q in names if q not in known]
        if unknown:
            raise errors.InvalidInput.field("queues", f"unknown queue(s): {', '.join(unknown)}")
        live = Counter(q for w in live_workers(get_redis()) for q in set(w.get("queues", [])))
        depths = queue_depths(names)
        return scheduler_pb2.QueueStatsResponse(queues=[
            scheduler_pb2.QueueStat(name=q, depth=depths.get(q, 0), live_workers=live.get(q, 0)) for q in names
        ])

"""SchedulerService over gRPC: a thin adapter over `marketplace.scheduling.service`."""
from __future__ import annotations

import uuid
from collections import Counter

from sqlalchemy import select

from marketplace import errors
from marketplace.broker import queue_depths
from marketplace.catalog import CONTROL_QUEUES, get_catalog
from marketplace.grpc_server import Call, rpc
from marketplace.pb.scheduler import scheduler_pb2, scheduler_pb2_grpc
from marketplace.scheduling import service as scheduling
from marketplace.tasks import service as tasks
from marketplace.tasks.models import SubTask, TaskStatus


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
            task_id=task_id, status=task.status, queue=task.queue or "", subtask_count=len(outcome.subtask_ids),
            status_reason=task.status_reason or task.error or outcome.reason or "",
        )

    @rpc()
    def Reschedule(self, request: scheduler_pb2.RescheduleRequest, call: Call) -> scheduler_pb2.RescheduleResponse:
        task = tasks.get_task(call.session, task_id=request.task_id, user=call.me)
        task_id = str(task.id)
        if TaskStatus(task.status).final:
            raise errors.Conflict(f"task {task_id} is {task.status}; nothing to re-dispatch", task_status=task.status)
        call.session.rollback()
        ids = scheduling.redispatch_missing(task_id)
        indexes = sorted(call.session.scalars(
            select(SubTask.index).where(SubTask.id.in_([uuid.UUID(i) for i in ids]))
        )) if ids else []
        task = tasks.get_task(call.session, task_id=task_id)
        return scheduler_pb2.RescheduleResponse(task_id=task_id, status=task.status, redispatched_indexes=indexes)

    @rpc()
    def QueueStats(self, request: scheduler_pb2.QueueStatsRequest, call: Call) -> scheduler_pb2.QueueStatsResponse:
        from marketplace.redis_client import get_redis
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

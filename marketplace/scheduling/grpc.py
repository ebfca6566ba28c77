"""SchedulerService over gRPC: a thin adapter over `marketplace.scheduling.service`."""
from __future__ import annotations

import uuid
from collections import Counter

import redis
from sqlalchemy import select

from marketplace import errors
from marketplace.catalog import CONTROL_QUEUES, get_catalog
from marketplace.grpc_server import Call, rpc
from marketplace.pb.scheduler import scheduler_pb2, scheduler_pb2_grpc
from marketplace.scheduling import service as scheduling
from marketplace.settings import get_settings
from marketplace.tasks import service as tasks
from marketplace.tasks.models import SubTask, TaskStatus

_broker: redis.Redis | None = None


def broker_redis() -> redis.Redis:
    """The Celery broker's Redis (it may differ from the state Redis)."""
    global _broker
    if _broker is None:
        _broker = redis.Redis.from_url(get_settings().celery_broker_url, socket_connect_timeout=3, socket_timeout=5)
    return _broker


def queue_depth(r: redis.Redis, queue: str) -> int:
    """Messages waiting in `queue`, summed over kombu's priority lists.

    With `queue_order_strategy=priority` kombu keeps one list per priority
    step: `<queue>` for step 0 and `<queue><sep><step>` for the others.
    """
    from marketplace.celery_app import app

    opts = app.conf.broker_transport_options or {}
    sep = opts.get("sep", "\x06\x16")
    steps = opts.get("priority_steps") or [0, 3, 6, 9]
    names = [queue if not step else f"{queue}{sep}{step}" for step in sorted(set(steps))]
    pipe = r.pipeline(transaction=False)
    for name in names:
        pipe.llen(name)
    return int(sum(pipe.execute()))


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
        r = broker_redis()
        return scheduler_pb2.QueueStatsResponse(queues=[
            scheduler_pb2.QueueStat(name=q, depth=queue_depth(r, q), live_workers=live.get(q, 0)) for q in names
        ])

"""Every gRPC service over a real channel: happy paths and the status codes of the error table."""
from __future__ import annotations

import json
import uuid
from decimal import Decimal

import grpc
import pytest

from marketplace.pb.audit import audit_pb2
from marketplace.pb.billing import billing_pb2
from marketplace.pb.result import result_pb2
from marketplace.pb.scheduler import scheduler_pb2
from marketplace.pb.task import task_pb2
from marketplace.pb.user import user_pb2
from marketplace.pb.worker import worker_pb2

C = grpc.StatusCode


def _create(stubs, user, inputs, **kw):  # type: ignore[no-untyped-def]
    req = task_pb2.CreateTaskRequest(model=kw.pop("model", "echo"), inputs=[json.dumps(i) for i in inputs], **kw)
    return stubs.tasks.CreateTask(req, metadata=user["md"])


def _watch_to_end(stubs, user, task_id, timeout=120.0):  # type: ignore[no-untyped-def]
    stream = stubs.tasks.WatchTask(task_pb2.WatchTaskRequest(task_id=task_id), metadata=user["md"], timeout=timeout)
    return [r.task for r in stream]


def _waiting_task(stubs, user):  # type: ignore[no-untyped-def]
    """A task no node can run (no GPU embedding worker exists in tests): it stays Created."""
    resp = _create(stubs, user, ["some text"], model="embedding", device="gpu")
    return resp.task.id


# -- server plumbing ----------------------------------------------------------------------------

def test_health_reports_every_service_serving_and_reflection_lists_them(channel):  # type: ignore[no-untyped-def]
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    names = ["marketplace.task.v1.TaskService", "marketplace.scheduler.v1.SchedulerService",
             "marketplace.worker.v1.WorkerService", "marketplace.result.v1.ResultService",
             "marketplace.billing.v1.BillingService", "marketplace.audit.v1.AuditService",
             "marketplace.user.v1.UserService"]
    health = health_pb2_grpc.HealthStub(channel)
    for name in ["", *names]:
        assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert info.value.code() == C.NOT_FOUND

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    listed = {s.name for s in replies[0].list_services_response.service}
    assert set(names) <= listed and "grpc.health.v1.Health" in listed


def test_error_table_maps_every_domain_error():  # type: ignore[no-untyped-def]
    from marketplace.infra import errors
    from marketplace.rpc.calls import AlreadyExists, status_code_for

    assert status_code_for(errors.InvalidInput.field("x", "bad")) == C.INVALID_ARGUMENT
    assert status_code_for(errors.NotFound("x")) == C.NOT_FOUND
    assert status_code_for(errors.PermissionDenied("x")) == C.PERMISSION_DENIED
    assert status_code_for(errors.Unauthenticated("x")) == C.UNAUTHENTICATED
    assert status_code_for(errors.QuotaExceeded("x")) == C.RESOURCE_EXHAUSTED
    assert status_code_for(errors.PaymentRequired("x")) == C.FAILED_PRECONDITION
    assert status_code_for(errors.Conflict("x")) == C.FAILED_PRECONDITION
    assert status_code_for(AlreadyExists("x")) == C.ALREADY_EXISTS
    assert status_code_for(errors.Unavailable("x")) == C.UNAVAILABLE


# -- users and authentication ---------------------------------------------------------------------

def test_create_authenticate_and_get_user(stubs, rpc_error):  # type: ignore[no-untyped-def]
    email = f"Grpc-{uuid.uuid4().hex[:8]}@Example.com"
    created = stubs.users.CreateUser(user_pb2.CreateUserRequest(email=email, password="long enough pw")).user
    assert created.email == email.lower() and created.role == "user" and created.balance
    assert created.quotas.max_active_tasks > 0 and created.created_at.seconds > 0

    tokens = stubs.users.Authenticate(user_pb2.AuthenticateRequest(email=email, password="long enough pw"))
    assert tokens.token_type == "Bearer" and tokens.expires_in > 0 and tokens.refresh_token
    me = stubs.users.GetUser(user_pb2.GetUserRequest(),
                             metadata=(("authorization", f"Bearer {tokens.access_token}"),)).user
    assert me.id == created.id and me.email == email.lower()

    code, detail, meta = rpc_error(stubs.users.CreateUser, user_pb2.CreateUserRequest(email=email, password="x" * 10))
    assert code == C.ALREADY_EXISTS and "already registered" in detail
    code, _, meta = rpc_error(stubs.users.CreateUser, user_pb2.CreateUserRequest(email="not-an-email", password="x" * 10))
    assert code == C.INVALID_ARGUMENT and json.loads(meta["error-fields"])[0]["field"] == "email"
    code, _, meta = rpc_error(stubs.users.CreateUser, user_pb2.CreateUserRequest(email=f"a{email}", password="short"))
    assert code == C.INVALID_ARGUMENT and json.loads(meta["error-fields"])[0]["field"] == "password"
    code, _, _ = rpc_error(stubs.users.Authenticate, user_pb2.AuthenticateRequest(email=email, password="wrong pw!"))
    assert code == C.UNAUTHENTICATED


def test_missing_bad_and_wrong_type_tokens_are_unauthenticated(stubs, user, rpc_error):  # type: ignore[no-untyped-def]
    req = user_pb2.GetUserRequest()
    assert rpc_error(stubs.users.GetUser, req)[0] == C.UNAUTHENTICATED
    assert rpc_error(stubs.users.GetUser, req, metadata=(("authorization", "Bearer nope"),))[0] == C.UNAUTHENTICATED
    assert rpc_error(stubs.users.GetUser, req, metadata=(("authorization", "Basic abc"),))[0] == C.UNAUTHENTICATED
    refresh = (("authorization", f"Bearer {user['tokens'].refresh_token}"),)
    code, detail, _ = rpc_error(stubs.users.GetUser, req, metadata=refresh)
    assert code == C.UNAUTHENTICATED and "access token" in detail
    assert rpc_error(stubs.tasks.GetTask, task_pb2.GetTaskRequest(task_id="x"))[0] == C.UNAUTHENTICATED


def test_rest_and_grpc_tokens_are_interchangeable_and_rest_logout_revokes(stubs, user, client, rpc_error):  # type: ignore[no-untyped-def]
    from tests.support.api import register

    rest_user = register(client)
    me = stubs.users.GetUser(user_pb2.GetUserRequest(),
                             metadata=(("authorization", rest_user["headers"]["Authorization"]),)).user
    assert me.id == rest_user["id"]
    headers = {"Authorization": f"Bearer {user['token']}"}
    assert client.get("/v1/me", headers=headers).get_json()["id"] == user["id"]

    assert client.post("/v1/auth/logout", headers=headers).status_code == 204
    code, detail, _ = rpc_error(stubs.users.GetUser, user_pb2.GetUserRequest(), metadata=user["md"])
    assert code == C.UNAUTHENTICATED and "revoked" in detail


# -- tasks -----------------------------------------------------------------------------------------

def test_task_flow_create_watch_until_done_then_result(stubs, user, worker):  # type: ignore[no-untyped-def]
    inputs = [{"n": i} if i % 2 else f"item-{i}" for i in range(23)]
    created = _create(stubs, user, inputs, batch_size=5, idempotency_key="flow-1")
    task = created.task
    assert not created.idempotent_replay
    assert task.status == "Created" and task.model == "echo" and task.subtask_count == 5
    assert task.user_id == user["id"] and task.estimated_cost and task.created_at.seconds > 0

    updates = _watch_to_end(stubs, user, task.id)
    statuses = [u.status for u in updates]
    assert statuses[-1] == "Done", updates[-1]
    order = ["Created", "Scheduled", "InProgress", "Done"]
    assert [order.index(s) for s in statuses] == sorted(order.index(s) for s in statuses)
    dones = [u.progress.done for u in updates]
    assert dones == sorted(dones) and dones[-1] == 5 and updates[-1].progress.total == 5
    final = updates[-1]
    assert final.queue == "cpu.generic" and final.cost and final.finished_at.seconds > 0

    result = stubs.results.GetResult(result_pb2.GetResultRequest(task_id=task.id), metadata=user["md"])
    assert result.task_id == task.id and result.model == "echo"
    assert [json.loads(o) for o in result.outputs] == inputs

    got = stubs.tasks.GetTask(task_pb2.GetTaskRequest(task_id=task.id), metadata=user["md"]).task
    assert got.status == "Done" and got.progress.done == 5
    subs = stubs.tasks.GetSubTasks(task_pb2.GetSubTasksRequest(task_id=task.id), metadata=user["md"])
    assert [s.index for s in subs.subtasks] == [0, 1, 2, 3, 4]
    assert all(s.status == "Done" and s.worker and s.attempts == 1 and s.items for s in subs.subtasks)
    assert sum(s.items for s in subs.subtasks) == 23
    assert not subs.HasField("next_after")  # unpaged: all of them
    page = stubs.tasks.GetSubTasks(task_pb2.GetSubTasksRequest(task_id=task.id, limit=2), metadata=user["md"])
    assert [s.index for s in page.subtasks] == [0, 1] and page.next_after == 1
    page = stubs.tasks.GetSubTasks(task_pb2.GetSubTasksRequest(task_id=task.id, limit=2, after=3), metadata=user["md"])
    assert [s.index for s in page.subtasks] == [4] and not page.HasField("next_after")
    done = stubs.tasks.GetSubTasks(task_pb2.GetSubTasksRequest(task_id=task.id, status="Failed"), metadata=user["md"])
    assert not done.subtasks

    replay = _create(stubs, user, inputs, batch_size=5, idempotency_key="flow-1")
    assert replay.idempotent_replay and replay.task.id == task.id


def test_watch_of_a_task_cancelled_mid_run_ends_on_its_settled_cost(stubs, user, worker):  # type: ignore[no-untyped-def]
    """The running subtasks finish and are charged after the cancel: the stream waits for them,
    where it ended on the first Cancelled document, with a cost that then went up."""
    import threading
    import time

    task_id = _create(stubs, user, list(range(8)), batch_size=2, params_json='{"sleep_s": 0.5}').task.id
    seen: list = []
    watcher = threading.Thread(target=lambda: seen.extend(_watch_to_end(stubs, user, task_id)))
    watcher.start()
    deadline = time.monotonic() + 60
    while not any(s.status == "Running" for s in stubs.tasks.GetSubTasks(
            task_pb2.GetSubTasksRequest(task_id=task_id), metadata=user["md"]).subtasks):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert stubs.tasks.CancelTask(task_pb2.CancelTaskRequest(task_id=task_id), metadata=user["md"]).task.status \
        == "Cancelled"
    watcher.join(timeout=90)
    assert not watcher.is_alive() and seen[-1].status == "Cancelled"
    subtasks = stubs.tasks.GetSubTasks(task_pb2.GetSubTasksRequest(task_id=task_id), metadata=user["md"]).subtasks
    assert not any(s.status == "Running" for s in subtasks) and any(s.status == "Done" for s in subtasks)
    settled = stubs.tasks.GetTask(task_pb2.GetTaskRequest(task_id=task_id), metadata=user["md"]).task
    assert seen[-1].cost == settled.cost and Decimal(settled.cost) > 0
    ledger = stubs.billing.GetLedger(billing_pb2.GetLedgerRequest(task_id=task_id), metadata=user["md"]).entries
    assert -sum(Decimal(e.amount) for e in ledger) == Decimal(settled.cost)


def test_watch_of_a_final_task_sends_once_and_ends(stubs, user, worker):  # type: ignore[no-untyped-def]
    task_id = _create(stubs, user, [1, 2]).task.id
    assert _watch_to_end(stubs, user, task_id)[-1].status == "Done"
    again = _watch_to_end(stubs, user, task_id, timeout=10)
    assert [u.status for u in again] == ["Done"]


def test_create_task_errors(stubs, user, new_user, update_user, rpc_error):  # type: ignore[no-untyped-def]
    code, detail, meta = rpc_error(_create, stubs, user, [1], model="no-such-model")
    assert code == C.INVALID_ARGUMENT and json.loads(meta["error-fields"])[0]["field"] == "model"
    req = task_pb2.CreateTaskRequest(model="echo", inputs=["{not json"])
    code, _, meta = rpc_error(stubs.tasks.CreateTask, req, metadata=user["md"])
    assert code == C.INVALID_ARGUMENT and json.loads(meta["error-fields"])[0]["field"] == "inputs[0]"
    # What json.loads takes and PostgreSQL refuses: INTERNAL once, from the INSERT.
    for item, words in (("NaN", "NaN"), ("[1, Infinity]", "NaN"), (json.dumps("a\u0000b"), "NUL"),
                        ("[" * 300 + "]" * 300, "nests more than 64")):
        req = task_pb2.CreateTaskRequest(model="echo", inputs=["1", item])
        code, detail, meta = rpc_error(stubs.tasks.CreateTask, req, metadata=user["md"])
        assert code == C.INVALID_ARGUMENT and words in detail, (item[:20], code, detail)
        assert json.loads(meta["error-fields"])[0]["field"].startswith("inputs"), meta
    code, _, meta = rpc_error(_create, stubs, user, [1], priority=12)
    assert code == C.INVALID_ARGUMENT and json.loads(meta["error-fields"])[0]["field"] == "priority"
    assert rpc_error(_create, stubs, user, [])[0] == C.INVALID_ARGUMENT

    _create(stubs, user, [1], idempotency_key="same-key")
    code, detail, _ = rpc_error(_create, stubs, user, [2], idempotency_key="same-key")
    assert code == C.FAILED_PRECONDITION and "Idempotency-Key" in detail

    limited = new_user()
    update_user(limited["id"], max_items_per_task=2)
    code, detail, _ = rpc_error(_create, stubs, limited, [1, 2, 3])
    assert code == C.RESOURCE_EXHAUSTED and "max_items_per_task" in detail

    broke = new_user()
    update_user(broke["id"], balance=0)
    code, detail, _ = rpc_error(_create, stubs, broke, [1])
    assert code == C.FAILED_PRECONDITION and "balance" in detail


def test_other_users_tasks_are_not_found(stubs, user, new_user, rpc_error):  # type: ignore[no-untyped-def]
    task_id = _waiting_task(stubs, user)
    other = new_user()
    for call, req in [
        (stubs.tasks.GetTask, task_pb2.GetTaskRequest(task_id=task_id)),
        (stubs.tasks.GetSubTasks, task_pb2.GetSubTasksRequest(task_id=task_id)),
        (stubs.results.GetResult, result_pb2.GetResultRequest(task_id=task_id)),
        (stubs.scheduler.Schedule, scheduler_pb2.ScheduleRequest(task_id=task_id)),
        (stubs.scheduler.Reschedule, scheduler_pb2.RescheduleRequest(task_id=task_id)),
    ]:
        assert rpc_error(call, req, metadata=other["md"])[0] == C.NOT_FOUND, call
    code, _, _ = rpc_error(stubs.tasks.WatchTask(task_pb2.WatchTaskRequest(task_id=task_id), metadata=other["md"]).__next__)
    assert code == C.NOT_FOUND
    for bad in ("not-a-uuid", str(uuid.uuid4())):
        assert rpc_error(stubs.tasks.GetTask, task_pb2.GetTaskRequest(task_id=bad), metadata=user["md"])[0] == C.NOT_FOUND


def test_list_and_cancel_tasks(stubs, new_user, worker, rpc_error):  # type: ignore[no-untyped-def]
    user = new_user()
    waiting = [_waiting_task(stubs, user) for _ in range(3)]
    page1 = stubs.tasks.ListTasks(task_pb2.ListTasksRequest(limit=2), metadata=user["md"])
    assert [t.id for t in page1.tasks] == waiting[::-1][:2] and page1.next_cursor
    assert all(t.user_id == user["id"] and t.batch_size for t in page1.tasks)
    page2 = stubs.tasks.ListTasks(task_pb2.ListTasksRequest(limit=2, cursor=page1.next_cursor), metadata=user["md"])
    assert [t.id for t in page2.tasks] == [waiting[0]] and not page2.next_cursor
    code, _, _ = rpc_error(stubs.tasks.ListTasks, task_pb2.ListTasksRequest(status="Sleeping"), metadata=user["md"])
    assert code == C.INVALID_ARGUMENT
    code, _, _ = rpc_error(stubs.tasks.ListTasks, task_pb2.ListTasksRequest(cursor="garbage!"), metadata=user["md"])
    assert code == C.INVALID_ARGUMENT

    cancel = task_pb2.CancelTaskRequest(task_id=waiting[1])
    assert stubs.tasks.CancelTask(cancel, metadata=user["md"]).task.status == "Cancelled"
    assert stubs.tasks.CancelTask(cancel, metadata=user["md"]).task.status == "Cancelled"  # idempotent
    cancelled = stubs.tasks.ListTasks(task_pb2.ListTasksRequest(status="Cancelled"), metadata=user["md"])
    assert [t.id for t in cancelled.tasks] == [waiting[1]]
    balance = stubs.billing.GetBalance(billing_pb2.GetBalanceRequest(), metadata=user["md"])
    assert balance.held != "0.000000"  # the two waiting tasks still hold; the cancelled one released

    done_id = _create(stubs, user, [1]).task.id
    assert _watch_to_end(stubs, user, done_id)[-1].status == "Done"
    code, detail, _ = rpc_error(stubs.tasks.CancelTask, task_pb2.CancelTaskRequest(task_id=done_id),
                                metadata=user["md"])
    assert code == C.FAILED_PRECONDITION and "Done" in detail


# -- scheduler ---------------------------------------------------------------------------------------

def test_schedule_and_reschedule(stubs, user, admin, worker, rpc_error):  # type: ignore[no-untyped-def]
    import time

    waiting = _waiting_task(stubs, user)
    resp = stubs.scheduler.Schedule(scheduler_pb2.ScheduleRequest(task_id=waiting), metadata=user["md"])
    assert resp.task_id == waiting and resp.status == "Created" and "gpu.embedding" in resp.status_reason
    again = stubs.scheduler.Reschedule(scheduler_pb2.RescheduleRequest(task_id=waiting), metadata=user["md"])
    assert again.status == "Created" and list(again.redispatched_indexes) == []

    # A moving task: its owner may not queue copies of it (each call re-sent every open subtask),
    # an admin may; the copies are skipped and charged nothing. Only subtasks still waiting are sent
    # (those the node runs are its own): enough of them that some still wait at the call.
    running = _create(stubs, user, [1, 2, 3, 4, 5, 6, 7, 8], batch_size=1, params_json='{"sleep_s": 0.4}').task.id
    deadline = time.monotonic() + 60
    while stubs.tasks.GetTask(task_pb2.GetTaskRequest(task_id=running), metadata=user["md"]).task.status != \
            "InProgress":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    code, detail, _ = rpc_error(stubs.scheduler.Reschedule, scheduler_pb2.RescheduleRequest(task_id=running),
                                metadata=user["md"])
    assert code == C.FAILED_PRECONDITION and "has not moved for 30 s" in detail, detail
    kicked = stubs.scheduler.Reschedule(scheduler_pb2.RescheduleRequest(task_id=running), metadata=admin["md"])
    assert kicked.redispatched_indexes
    assert _watch_to_end(stubs, user, running)[-1].status == "Done"
    charges = stubs.billing.GetLedger(billing_pb2.GetLedgerRequest(task_id=running), metadata=user["md"]).entries
    assert sorted(e.subtask_id for e in charges) == sorted(
        s.id for s in stubs.tasks.GetSubTasks(task_pb2.GetSubTasksRequest(task_id=running), metadata=user["md"]).subtasks)

    done_id = _create(stubs, user, [1, 2, 3]).task.id
    assert _watch_to_end(stubs, user, done_id)[-1].status == "Done"
    code, detail, _ = rpc_error(stubs.scheduler.Schedule, scheduler_pb2.ScheduleRequest(task_id=done_id),
                                metadata=user["md"])
    assert code == C.FAILED_PRECONDITION and "Done" in detail
    code, _, _ = rpc_error(stubs.scheduler.Reschedule, scheduler_pb2.RescheduleRequest(task_id=done_id),
                           metadata=user["md"])
    assert code == C.FAILED_PRECONDITION


def test_queue_stats_counts_every_priority_list_and_live_workers(stubs, user, worker, rpc_error):  # type: ignore[no-untyped-def]
    from marketplace.infra.celery_app import app

    queue = "cpu.resnet50"  # no test node consumes it, so published messages stay put
    before = stubs.scheduler.QueueStats(scheduler_pb2.QueueStatsRequest(queues=[queue]), metadata=user["md"])
    for priority in (0, 3, 9):
        app.send_task("workers.run_subtask", args=[str(uuid.uuid4())], queue=queue, priority=priority)
    after = stubs.scheduler.QueueStats(scheduler_pb2.QueueStatsRequest(queues=[queue, "cpu.generic"]),
                                       metadata=user["md"])
    stats = {q.name: q for q in after.queues}
    assert stats[queue].depth == before.queues[0].depth + 3
    assert stats[queue].live_workers == 0 and stats["cpu.generic"].live_workers >= 1

    every = stubs.scheduler.QueueStats(scheduler_pb2.QueueStatsRequest(), metadata=user["md"])
    assert {"marketplace.scheduler", "cpu.generic", "gpu.resnet50"} <= {q.name for q in every.queues}
    code, _, meta = rpc_error(stubs.scheduler.QueueStats, scheduler_pb2.QueueStatsRequest(queues=["nope"]),
                              metadata=user["md"])
    assert code == C.INVALID_ARGUMENT


# -- workers --------------------------------------------------------------------------------------------

def test_register_heartbeat_list_and_capabilities(stubs, user, admin, worker, rpc_error):  # type: ignore[no-untyped-def]
    hostname = f"grpc-node-{uuid.uuid4().hex[:6]}"
    reg = worker_pb2.RegisterRequest(hostname=hostname, queues=["cpu.resnet50"], models=["resnet50"], concurrency=3,
                                     facts=worker_pb2.WorkerFacts(cpu_count=8, memory_bytes=2**34))
    assert rpc_error(stubs.workers.Register, reg, metadata=user["md"])[0] == C.PERMISSION_DENIED
    for bad, field in ((dict(queues=["bogus.queue"], models=["resnet50"]), "queues"),
                       (dict(queues=["cpu.resnet50"], models=["zzz"]), "models"),
                       (dict(queues=["cpu.resnet50"], models=["echo"]), "models")):
        code, _, meta = rpc_error(stubs.workers.Register, worker_pb2.RegisterRequest(hostname=hostname, **bad),
                                  metadata=admin["md"])
        assert code == C.INVALID_ARGUMENT and json.loads(meta["error-fields"])[0]["field"] == field, bad
    resp = stubs.workers.Register(reg, metadata=admin["md"])
    assert resp.worker.hostname == hostname and resp.worker.status == "online" and resp.heartbeat_ttl_seconds > 0
    assert resp.worker.facts.cpu_count == 8 and resp.worker.concurrency == 3

    beat = stubs.workers.Heartbeat(worker_pb2.HeartbeatRequest(hostname=hostname, running=2), metadata=admin["md"])
    assert beat.worker.running == 2 and beat.worker.last_heartbeat.seconds > 0
    code, _, _ = rpc_error(stubs.workers.Heartbeat, worker_pb2.HeartbeatRequest(hostname="ghost"), metadata=admin["md"])
    assert code == C.NOT_FOUND

    listed = stubs.workers.ListWorkers(worker_pb2.ListWorkersRequest(queue="cpu.resnet50"), metadata=user["md"])
    assert hostname in [w.hostname for w in listed.workers]
    online = stubs.workers.ListWorkers(worker_pb2.ListWorkersRequest(status="online"), metadata=user["md"])
    assert worker.hostname in [w.hostname for w in online.workers]
    assert all(w.status == "online" for w in online.workers)
    code, _, _ = rpc_error(stubs.workers.ListWorkers, worker_pb2.ListWorkersRequest(status="asleep"),
                           metadata=user["md"])
    assert code == C.INVALID_ARGUMENT

    caps = stubs.workers.Capabilities(worker_pb2.CapabilitiesRequest(model="echo"), metadata=user["md"])
    assert [(c.model, c.device, c.queue) for c in caps.capabilities] == [("echo", "cpu", "cpu.generic")]
    assert caps.capabilities[0].live_workers >= 1
    gpu = stubs.workers.Capabilities(worker_pb2.CapabilitiesRequest(device="gpu"), metadata=user["md"])
    assert gpu.capabilities and all(c.device == "gpu" and c.live_workers == 0 for c in gpu.capabilities)
    code, _, _ = rpc_error(stubs.workers.Capabilities, worker_pb2.CapabilitiesRequest(model="nope"),
                           metadata=user["md"])
    assert code == C.INVALID_ARGUMENT


# -- results ----------------------------------------------------------------------------------------------

def test_subtask_paging_arguments_are_checked(stubs, user, rpc_error):  # type: ignore[no-untyped-def]
    waiting = _waiting_task(stubs, user)
    for bad, field in ((task_pb2.GetSubTasksRequest(task_id=waiting, status="Sleeping"), "status"),
                       (task_pb2.GetSubTasksRequest(task_id=waiting, limit=-1), "limit"),
                       (task_pb2.GetSubTasksRequest(task_id=waiting, limit=1001), "limit"),
                       (task_pb2.GetSubTasksRequest(task_id=waiting, after=-5), "after"),
                       (task_pb2.GetSubTasksRequest(), "task_id")):
        code, detail, _ = rpc_error(stubs.tasks.GetSubTasks, bad, metadata=user["md"])
        assert code == C.INVALID_ARGUMENT and field in detail
    code, detail, _ = rpc_error(stubs.tasks.GetTask, task_pb2.GetTaskRequest(), metadata=user["md"])
    assert code == C.INVALID_ARGUMENT and "task_id: required" in detail  # it was NOT_FOUND "task  not found"


def test_finalize_and_result_preconditions(stubs, user, admin, worker, rpc_error):  # type: ignore[no-untyped-def]
    waiting = _waiting_task(stubs, user)
    code, detail, _ = rpc_error(stubs.results.GetResult, result_pb2.GetResultRequest(task_id=waiting),
                                metadata=user["md"])
    assert code == C.FAILED_PRECONDITION and "Created" in detail
    partial = stubs.results.GetResult(result_pb2.GetResultRequest(task_id=waiting, partial=True), metadata=user["md"])
    assert list(partial.outputs) == ["null"] and partial.status == "Created" and not partial.complete
    assert [(m.index, m.first_item, m.items, m.status, m.error) for m in partial.missing] == [(0, 0, 1, "Pending", "")]
    req = result_pb2.FinalizeRequest(task_id=waiting)
    assert rpc_error(stubs.results.Finalize, req, metadata=user["md"])[0] == C.PERMISSION_DENIED
    assert rpc_error(stubs.results.Finalize, req, metadata=admin["md"])[0] == C.FAILED_PRECONDITION

    done_id = _create(stubs, user, ["a", "b"]).task.id
    assert _watch_to_end(stubs, user, done_id)[-1].status == "Done"
    fin = stubs.results.Finalize(result_pb2.FinalizeRequest(task_id=done_id), metadata=admin["md"])
    assert fin.status == "Done" and fin.result_key == f"results/{done_id}/result.json" and fin.cost

    part = result_pb2.SavePartialRequest(task_id=done_id, index=0, outputs=['"a"'])
    assert rpc_error(stubs.results.SavePartial, part, metadata=user["md"])[0] == C.PERMISSION_DENIED


# -- billing ------------------------------------------------------------------------------------------------

def test_balance_of_self_and_admin_only_for_others(stubs, user, new_user, admin, rpc_error):  # type: ignore[no-untyped-def]
    mine = stubs.billing.GetBalance(billing_pb2.GetBalanceRequest(), metadata=user["md"])
    assert mine.user_id == user["id"] and mine.balance == mine.available and mine.held in ("0", "0.000000")
    _waiting_task(stubs, user)  # holds its estimate
    held = stubs.billing.GetBalance(billing_pb2.GetBalanceRequest(), metadata=user["md"])
    from decimal import Decimal

    assert Decimal(held.held) > 0 and Decimal(held.available) == Decimal(held.balance) - Decimal(held.held)

    other = new_user()
    req = billing_pb2.GetBalanceRequest(user_id=other["id"])
    assert rpc_error(stubs.billing.GetBalance, req, metadata=user["md"])[0] == C.PERMISSION_DENIED
    assert stubs.billing.GetBalance(req, metadata=admin["md"]).user_id == other["id"]
    code, _, _ = rpc_error(stubs.billing.GetBalance, billing_pb2.GetBalanceRequest(user_id=str(uuid.uuid4())),
                           metadata=admin["md"])
    assert code == C.NOT_FOUND


def test_admin_only_billing_and_audit_methods_refuse_users(stubs, user, rpc_error):  # type: ignore[no-untyped-def]
    for call, req in [
        (stubs.billing.TopUp, billing_pb2.TopUpRequest(user_id=user["id"], amount="5")),
        (stubs.billing.Charge, billing_pb2.ChargeRequest(task_id=str(uuid.uuid4()), amount="1")),
        (stubs.audit.Append, audit_pb2.AppendRequest(action="x", subject="y")),
        (stubs.audit.Verify, audit_pb2.VerifyRequest()),
    ]:
        assert rpc_error(call, req, metadata=user["md"])[0] == C.PERMISSION_DENIED, call


def test_ledger_quota_and_topup(stubs, user, admin, worker, rpc_error):  # type: ignore[no-untyped-def]
    from decimal import Decimal

    task_id = _create(stubs, user, [1, 2, 3], batch_size=1).task.id
    assert _watch_to_end(stubs, user, task_id)[-1].status == "Done"
    ledger = stubs.billing.GetLedger(billing_pb2.GetLedgerRequest(), metadata=user["md"])
    kinds = [e.kind for e in ledger.entries]
    assert kinds[-1] == "signup" and kinds.count("charge") == 3 and all(e.user_id == user["id"] for e in ledger.entries)
    assert all(e.settled for e in ledger.entries)  # the task settled at its end (it read false for every entry)
    page = stubs.billing.GetLedger(billing_pb2.GetLedgerRequest(task_id=task_id, limit=2), metadata=user["md"])
    assert len(page.entries) == 2 and page.next_cursor and all(e.task_id == task_id for e in page.entries)
    rest = stubs.billing.GetLedger(billing_pb2.GetLedgerRequest(task_id=task_id, limit=2, cursor=page.next_cursor),
                                   metadata=user["md"])
    assert len(rest.entries) == 1 and not rest.next_cursor
    assert all(Decimal(e.amount) < 0 for e in [*page.entries, *rest.entries])
    assert rpc_error(stubs.billing.GetLedger, billing_pb2.GetLedgerRequest(task_id="x"), metadata=user["md"])[0] \
        == C.INVALID_ARGUMENT
    for cursor in ("-1", "0"):  # as REST's cursor >= 1
        code, _, meta = rpc_error(stubs.billing.GetLedger, billing_pb2.GetLedgerRequest(cursor=cursor), metadata=user["md"])
        assert code == C.INVALID_ARGUMENT and json.loads(meta["error-fields"])[0]["field"] == "cursor"

    quota = stubs.billing.GetQuota(billing_pb2.GetQuotaRequest(), metadata=user["md"])
    assert quota.user_id == user["id"] and quota.quota.max_active_tasks > 0 and quota.quota.daily_spend_limit
    assert quota.usage.active_tasks == 0 and Decimal(quota.usage.spent_today) > 0
    assert rpc_error(stubs.billing.GetQuota, billing_pb2.GetQuotaRequest(user_id=admin["id"]),
                     metadata=user["md"])[0] == C.PERMISSION_DENIED

    before = Decimal(stubs.billing.GetBalance(billing_pb2.GetBalanceRequest(), metadata=user["md"]).balance)
    top = stubs.billing.TopUp(billing_pb2.TopUpRequest(user_id=user["id"], amount="12.5"), metadata=admin["md"])
    assert top.entry.kind == "topup" and Decimal(top.entry.amount) == Decimal("12.5") and top.entry.settled
    assert Decimal(top.balance) == before + Decimal("12.5")
    for bad in ("-1", "abc", "0", "1e30"):
        code, _, meta = rpc_error(stubs.billing.TopUp, billing_pb2.TopUpRequest(user_id=user["id"], amount=bad),
                                  metadata=admin["md"])
        assert code == C.INVALID_ARGUMENT and json.loads(meta["error-fields"])[0]["field"] == "amount"
    code, _, _ = rpc_error(stubs.billing.TopUp, billing_pb2.TopUpRequest(user_id=str(uuid.uuid4()), amount="1"),
                           metadata=admin["md"])
    assert code == C.NOT_FOUND


def test_audit_append_query_verify_and_public_key(stubs, user, new_user, admin, worker, rpc_error):  # type: ignore[no-untyped-def]
    task_id = _create(stubs, user, ["x"]).task.id
    assert _watch_to_end(stubs, user, task_id)[-1].status == "Done"

    appended = stubs.audit.Append(audit_pb2.AppendRequest(action="ops.note", subject="ops", task_id=task_id,
                                                          data_json='{"why": "test", "n": 1}'), metadata=admin["md"])
    rec = appended.record
    assert rec.seq > 0 and rec.actor == f"user:{admin['id']}" and rec.task_id == task_id and len(rec.hash) == 64
    assert json.loads(rec.data_json) == {"why": "test", "n": 1} and rec.signature
    code, _, _ = rpc_error(stubs.audit.Append, audit_pb2.AppendRequest(action="a", subject="b", data_json="[1]"),
                           metadata=admin["md"])
    assert code == C.INVALID_ARGUMENT
    # Past the columns (it was cut, written, then answered UNAVAILABLE), NaN or NUL (INTERNAL).
    for fields, name in (({"action": "a" * 65}, "action"), ({"subject": "s" * 256}, "subject"),
                         ({"data_json": '{"n": NaN}'}, "data_json.n"), ({"action": "a\x00b"}, "action")):
        req = audit_pb2.AppendRequest(**{"action": "ops.note", "subject": "ops", **fields})
        code, _, meta = rpc_error(stubs.audit.Append, req, metadata=admin["md"])
        assert code == C.INVALID_ARGUMENT and json.loads(meta["error-fields"])[0]["field"] == name, (fields, code)
    from sqlalchemy import or_, select

    from marketplace.audit.models import AuditPending, AuditRecord
    from marketplace.infra.db import session_scope

    with session_scope() as session:  # nothing of them written, cut or whole
        for table in (AuditRecord, AuditPending):
            assert not session.scalars(select(table.seq if table is AuditRecord else table.id).where(
                or_(table.action.startswith("a" * 64), table.subject.startswith("s" * 255)))).all()

    mine = stubs.audit.Query(audit_pb2.QueryRequest(task_id=task_id), metadata=user["md"])
    actions = [r.action for r in mine.records]
    assert "task.created" in actions and "task.done" in actions and "ops.note" in actions
    assert [r.seq for r in mine.records] == sorted(r.seq for r in mine.records)
    first = stubs.audit.Query(audit_pb2.QueryRequest(task_id=task_id, limit=1), metadata=user["md"])
    assert len(first.records) == 1 and first.next_after_seq == first.records[0].seq
    following = stubs.audit.Query(audit_pb2.QueryRequest(task_id=task_id, after_seq=first.next_after_seq),
                                  metadata=user["md"])
    assert [r.seq for r in following.records] == [r.seq for r in mine.records][1:]
    other = new_user()
    assert rpc_error(stubs.audit.Query, audit_pb2.QueryRequest(task_id=task_id), metadata=other["md"])[0] \
        == C.NOT_FOUND

    verdict = stubs.audit.Verify(audit_pb2.VerifyRequest(), metadata=admin["md"])
    assert verdict.valid and verdict.length >= rec.seq and len(verdict.head) == 64 and not verdict.reason

    key = stubs.audit.GetPublicKey(audit_pb2.GetPublicKeyRequest())
    assert key.algorithm == "ed25519" and "BEGIN PUBLIC KEY" in key.public_key_pem
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    load_pem_public_key(key.public_key_pem.encode()).verify(bytes.fromhex(rec.signature), bytes.fromhex(rec.hash))


def test_backing_service_outages_are_unavailable_and_surprises_internal():  # type: ignore[no-untyped-def]
    import redis
    from sqlalchemy.exc import OperationalError

    from marketplace.rpc.calls import to_failure

    db_down = to_failure(OperationalError("SELECT 1", {}, Exception("connection refused")))
    assert db_down.code == C.UNAVAILABLE and "database" in db_down.detail
    assert to_failure(redis.exceptions.ConnectionError("refused")).code == C.UNAVAILABLE
    surprise = to_failure(RuntimeError("secret internals"))
    assert surprise.code == C.INTERNAL and "secret" not in surprise.detail


def test_save_partial_records_parts_that_finalize_joins(stubs, user, admin, rpc_error):  # type: ignore[no-untyped-def]
    """A node outside Celery reports its parts over gRPC; finalize joins them like any other."""
    waiting = _waiting_task(stubs, user)  # one subtask, nobody serves gpu.embedding
    bad = result_pb2.SavePartialRequest(task_id=waiting, index=0, outputs=["[1]", "[2]"], worker="ext")
    code, detail, _ = rpc_error(stubs.results.SavePartial, bad, metadata=admin["md"])
    assert code == C.INVALID_ARGUMENT and "outputs" in detail
    code, _, _ = rpc_error(stubs.results.SavePartial, result_pb2.SavePartialRequest(task_id=waiting, index=7,
                                                                                    outputs=["1"]),
                           metadata=admin["md"])
    assert code == C.NOT_FOUND
    saved = stubs.results.SavePartial(
        result_pb2.SavePartialRequest(task_id=waiting, index=0, outputs=["[0.5, 0.25]"], seconds=0.2, worker="ext"),
        metadata=admin["md"])
    assert saved.key == f"results/{waiting}/parts/0.json" and saved.items == 1 and len(saved.sha256) == 64
    again = result_pb2.SavePartialRequest(task_id=waiting, index=0, outputs=["[1]"], worker="ext")
    assert rpc_error(stubs.results.SavePartial, again, metadata=admin["md"])[0] == C.FAILED_PRECONDITION
    fin = stubs.results.Finalize(result_pb2.FinalizeRequest(task_id=waiting), metadata=admin["md"])
    assert fin.status == "Done"
    got = stubs.results.GetResult(result_pb2.GetResultRequest(task_id=waiting), metadata=user["md"])
    assert [json.loads(o) for o in got.outputs] == [[0.5, 0.25]]
    got = stubs.results.GetResult(result_pb2.GetResultRequest(task_id=waiting, partial=True), metadata=user["md"])
    assert [json.loads(o) for o in got.outputs] == [[0.5, 0.25]] and got.complete and not got.missing


def test_charge_is_idempotent_per_subtask_and_adjustments_settle(stubs, user, admin, worker, rpc_error):  # type: ignore[no-untyped-def]
    from decimal import Decimal

    done_id = _create(stubs, user, ["a"]).task.id
    assert _watch_to_end(stubs, user, done_id)[-1].status == "Done"
    sub = stubs.tasks.GetSubTasks(task_pb2.GetSubTasksRequest(task_id=done_id), metadata=user["md"]).subtasks[0]
    dup = stubs.billing.Charge(billing_pb2.ChargeRequest(task_id=done_id, subtask_id=sub.id, amount="5"),
                               metadata=admin["md"])
    assert not dup.created and dup.entry.kind == "charge" and Decimal(dup.entry.amount) < 0  # the signal's charge
    before = Decimal(stubs.billing.GetBalance(billing_pb2.GetBalanceRequest(), metadata=user["md"]).balance)
    adj = stubs.billing.Charge(billing_pb2.ChargeRequest(task_id=done_id, amount="0.5", kind="adjustment",
                                                         detail="manual"), metadata=admin["md"])
    assert adj.created and adj.entry.kind == "adjustment" and Decimal(adj.entry.amount) == Decimal("-0.5")
    after = Decimal(stubs.billing.GetBalance(billing_pb2.GetBalanceRequest(), metadata=user["md"]).balance)
    assert after == before - Decimal("0.5")  # the task was settled already: settled at once
    for req, expected in [
        (billing_pb2.ChargeRequest(task_id=done_id, amount="1", kind="bogus"), C.INVALID_ARGUMENT),
        (billing_pb2.ChargeRequest(task_id=done_id, amount="-1"), C.INVALID_ARGUMENT),
        (billing_pb2.ChargeRequest(task_id=done_id, amount="1"), C.INVALID_ARGUMENT),  # a charge needs its subtask
        (billing_pb2.ChargeRequest(task_id=str(uuid.uuid4()), amount="1", kind="adjustment"), C.NOT_FOUND),
    ]:
        assert rpc_error(stubs.billing.Charge, req, metadata=admin["md"])[0] == expected, req
    user_try = billing_pb2.ChargeRequest(task_id=done_id, amount="1", kind="adjustment")
    assert rpc_error(stubs.billing.Charge, user_try, metadata=user["md"])[0] == C.PERMISSION_DENIED


def test_marketplace_grpc_command_serves_health_and_calls(stack):  # type: ignore[no-untyped-def]
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from marketplace.pb.task import task_pb2_grpc
    from marketplace.pb.user import user_pb2_grpc
    from tests.support.servers import free_port

    port, metrics_port = free_port(), free_port()
    exe = Path(sys.executable).parent / "marketplace"
    proc = subprocess.Popen([str(exe), "grpc", "--host", "127.0.0.1", "--port", str(port)],
                            env={**os.environ, "MARKETPLACE_METRICS_PORT": str(metrics_port)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            grpc.channel_ready_future(ch).result(timeout=60)
            status = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="marketplace.task.v1.TaskService"), timeout=10)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            email = f"cli-{uuid.uuid4().hex[:8]}@example.com"
            user = user_pb2_grpc.UserServiceStub(ch).CreateUser(
                user_pb2.CreateUserRequest(email=email, password="long enough pw"), timeout=30).user
            assert user.email == email
            # Its tasks are counted on its own /metrics (no process counted gRPC submissions).
            token = user_pb2_grpc.UserServiceStub(ch).Authenticate(
                user_pb2.AuthenticateRequest(email=email, password="long enough pw"), timeout=30).access_token
            md = [("authorization", f"Bearer {token}")]
            task_pb2_grpc.TaskServiceStub(ch).CreateTask(
                task_pb2.CreateTaskRequest(model="embedding", inputs=['"x"'], device="gpu"), metadata=md, timeout=30)
        import requests

        text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        assert 'marketplace_tasks_submitted_total{model="embedding"} 1.0' in text, text[:2000]
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode(errors="replace")
    assert proc.returncode == 0, out


def test_redundancy_over_grpc_and_reputation_in_list_workers(stubs, user, rpc_error, worker):  # type: ignore[no-untyped-def]
    code, _, meta = rpc_error(stubs.tasks.CreateTask, task_pb2.CreateTaskRequest(
        model="echo", inputs=["1"], redundancy=6), metadata=user["md"])
    assert code == C.INVALID_ARGUMENT and json.loads(meta["error-fields"])[0]["field"] == "redundancy"
    task = _create(stubs, user, [1, 2], redundancy=2, batch_size=1).task
    assert (task.redundancy, task.subtask_count) == (2, 4)
    listed = stubs.workers.ListWorkers(worker_pb2.ListWorkersRequest(status="online"), metadata=user["md"])
    mine = next(w for w in listed.workers if w.hostname == worker.hostname)
    assert mine.HasField("reputation") and mine.reputation.demoted is False
    assert mine.reputation.agreed >= 0 and 0.0 <= mine.reputation.score <= 1.0

"""Task Service: validation, storage and lookup of tasks. REST, gRPC and Kafka call these."""
from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import uuid
from datetime import datetime
from decimal import Decimal
from itertools import pairwise
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, make_transient_to_detached

from marketplace import observability
from marketplace.audit import service as audit
from marketplace.billing import service as billing
from marketplace.catalog import ModelSpec, get_catalog
from marketplace.events.outbox import emit
from marketplace.files.models import File
from marketplace.infra import names
from marketplace.infra.after_commit import defer
from marketplace.infra.db import utcnow
from marketplace.infra.errors import Conflict, InvalidInput, NotFound
from marketplace.infra.prepared import Prepared
from marketplace.settings import get_settings
from marketplace.tasks.models import SubTask, SubTaskStatus, Task, TaskStatus
from marketplace.tasks.params import check_params
from marketplace.tasks.schemas import Progress, ReplicaOut, SubTaskList, SubTaskOut, TaskOut, TaskRequest
from marketplace.users.models import User
from marketplace.webhooks.targets import check_submitted

logger = logging.getLogger(__name__)
MAX_TEXT_CHARS = 100_000
_KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")
# From this many items, reading the items and inserting the rows are most of a submit's work
# (200,000 one-item subtasks: ~2 s here). Such a submit asks `billing.check_hold` first, unlocked,
# so one its balance cannot cover is refused in milliseconds, and takes the balance lock only
# after its rows are in. With the lock taken first and held through the insert, one user's eight
# unfunded submits of that size queued on it, each refused in turn, until the last ones passed
# the statement timeout and were 503s. A smaller submit keeps the one-statement insert and lock:
# its check would be one more round trip than the work it saves.
BIG_SUBMIT_ITEMS = 1_000
_random = random.SystemRandom()  # which batches are spot-checked: not for a node to guess


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _request_hash(request: TaskRequest) -> str:
    return hashlib.sha256(canonical_json(request.model_dump(mode="json")).encode()).hexdigest()


def check_idempotency_key(key: str) -> None:
    if not _KEY_RE.match(key):
        raise InvalidInput.field("Idempotency-Key", "1 to 255 printable ASCII characters without spaces")


def resolve_model(request: TaskRequest) -> tuple[ModelSpec, list[str]]:
    """The catalog entry and the devices the task may run on; InvalidInput naming the field."""
    catalog = get_catalog()
    spec = catalog.get(request.model)
    if spec is None:
        raise InvalidInput.field("model", f"unknown model {request.model!r}; known: {', '.join(sorted(catalog.models))}")
    if request.device == "any":
        devices = list(spec.devices)
    elif request.device in spec.devices:
        devices = [request.device]
    else:
        raise InvalidInput.field("device", f"model {spec.name} runs on {', '.join(spec.devices)}, not {request.device}")
    return spec, devices


def _file_id(item: Any) -> uuid.UUID | None:
    raw = item.get("file") if isinstance(item, dict) and set(item) == {"file"} else item
    try:
        return uuid.UUID(str(raw)) if isinstance(raw, str) else None
    except ValueError:
        return None


def validate_items(session: Session, *, spec: ModelSpec, inputs: list[Any], user_id: uuid.UUID) -> list[Any]:
    """Check every item against the model's input kind; file items become `{"file": id}`."""
    errors: list[dict[str, Any]] = []
    items = list(inputs)
    if spec.input == "text":
        for i, item in enumerate(items):
            if not isinstance(item, str) or not item.strip():
                errors.append({"field": f"inputs[{i}]", "message": f"model {spec.name} takes non-empty text items"})
            elif len(item) > MAX_TEXT_CHARS:
                errors.append({"field": f"inputs[{i}]", "message": f"text longer than {MAX_TEXT_CHARS} characters"})
    elif spec.input == "file":
        wanted: dict[int, uuid.UUID] = {}
        for i, item in enumerate(items):
            fid = _file_id(item)
            if fid is None:
                errors.append({"field": f"inputs[{i}]", "message": 'expected {"file": "<file id>"} from POST /v1/files'})
            else:
                wanted[i] = fid
        if wanted:
            owned = set(
                session.scalars(select(File.id).where(File.id.in_(set(wanted.values())), File.user_id == user_id))
            )
            for i, fid in wanted.items():
                if fid not in owned:
                    errors.append({"field": f"inputs[{i}]", "message": f"file {fid} not found"})
                else:
                    items[i] = {"file": str(fid)}
    if errors:
        shown = errors[:20]
        raise InvalidInput(f"{len(errors)} input item(s) invalid; first: {shown[0]['field']}: {shown[0]['message']}", errors=shown)
    return items


def _chunk_count(items: int, size: int) -> int:
    """How many subtasks `_chunks` cuts `items` items into."""
    return -(-items // size)


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    """ceil(n / size) subtasks of at most `size` items whose sizes differ by at most one.

    Even sizes let parallel lanes end together: cut at exactly `size`, 2,000 sentences at 64
    were 31 subtasks of 64 and one of 16, and one lane idled through the other's last subtask
    (that job on a node of 2 lanes: ~3% more sentences/s even, interleaved A/B)."""
    count = _chunk_count(len(items), size)
    bounds = [i * len(items) // count for i in range(count + 1)] if count else [0]
    return [items[a:b] for a, b in pairwise(bounds)]


def _sizing_device(spec: ModelSpec, device: str) -> str:
    """The device a task's subtasks are cut for. The scheduler sends `any` to a GPU when one is
    live (`scheduling.service.candidate_queues`): cut for it when a GPU node that serves the model
    is live now, else at the CPU-safe size (were that node gone by then, a CPU runs the bigger
    batches, well within the time limit)."""
    if device != "any" or not spec.gpu_batch_size or "gpu" not in spec.devices:
        return device
    from redis.exceptions import RedisError

    from marketplace.infra.redis_client import get_redis
    from marketplace.registry.service import live_capacity

    if not get_settings().worker_capacity_check:
        return "cpu"
    try:
        capacity = live_capacity(get_redis(), model=spec.name)
    except RedisError:
        return "cpu"
    return "gpu" if capacity.get(spec.queue("gpu"), 0) > 0 else "cpu"


def current_trace_id() -> str | None:
    """The trace the calling request runs in (REST, gRPC and Kafka are each instrumented), if any."""
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def submit_task(
    session: Session, *, user_id: uuid.UUID, request: TaskRequest, idempotency_key: str | None = None,
) -> tuple[Task, bool]:
    """The one submit, for REST, gRPC and Kafka alike: validate and store the task (`create_task`,
    in the caller's transaction, with the trace it was submitted in), and send its first
    `schedule` message once that transaction commits. Returns (task, created): an Idempotency-Key
    seen before gives the task stored under it, not a new one."""
    task, created = create_task(session, user_id=user_id, request=request, idempotency_key=idempotency_key,
                                trace_id=current_trace_id())
    if created:
        defer(session, schedule_accepted, task.id, task.model)
    return task, created


def create_task(
    session: Session,
    *,
    user_id: uuid.UUID,
    request: TaskRequest,
    idempotency_key: str | None = None,
    trace_id: str | None = None,
) -> tuple[Task, bool]:
    """Validate and store a task with its subtasks, hold and TaskCreated event.

    Returns (task, created). `submit_task` sends its schedule message after the commit.
    """
    settings = get_settings()
    spec, devices = resolve_model(request)
    if idempotency_key is not None:
        check_idempotency_key(idempotency_key)
    keyed_hash = None
    if idempotency_key:
        keyed_hash = _request_hash(request)
        existing = _keyed_task(session, user_id=user_id, idempotency_key=idempotency_key, request_hash=keyed_hash)
        if existing is not None:
            return existing, False

    if request.webhook_url:  # whose tasks may aim inside the network is the owner's role (webhook_targets)
        check_submitted(session, user_id=user_id, url=str(request.webhook_url))
    params = {**spec.params, **request.params}
    check_params(spec.name, params)
    if "version" in spec.params:  # a model whose weights are pushed (resnet50): they must be there
        from marketplace.registry.weights import require_pushed

        require_pushed(spec.name, str(params["version"]))
    batch_size = request.batch_size or spec.default_batch_size(_sizing_device(spec, request.device))
    if batch_size > spec.max_batch_size:
        raise InvalidInput.field("batch_size", f"at most {spec.max_batch_size} for model {spec.name}")
    count = len(request.inputs)
    if count > settings.max_inputs:
        raise InvalidInput.field("inputs", f"at most {settings.max_inputs} items per task")
    from marketplace.billing import quotas

    quotas.check_submit(session, user_id=user_id, items=count)
    redundancy = _redundancy(session, user_id=user_id, requested=request.redundancy)
    # The estimate is a matter of counts: known, and checked, before any item is read. Each of the
    # k replicas is priced (spot checks and tie-breaks are the platform's).
    estimate = redundancy * max(billing.estimate_cost(spec, d, items=count, subtasks=_chunk_count(count, batch_size))
                                for d in devices)
    if request.max_cost is not None and estimate > request.max_cost:
        raise InvalidInput.field("max_cost", f"estimated cost {estimate} exceeds max_cost {request.max_cost}")
    big = count >= BIG_SUBMIT_ITEMS
    if big:  # what its hold would refuse, refused before the items are read and the rows built
        billing.check_hold(session, user_id=user_id, amount=estimate)
    items = validate_items(session, spec=spec, inputs=request.inputs, user_id=user_id)
    batches = _chunks(items, batch_size)
    spot = spot_checks(len(batches), redundancy=redundancy)
    rows = len(batches) * redundancy + len(spot)
    request_hash = keyed_hash or _request_hash(request)

    now = utcnow()
    # Every column set here, defaults included: the unkeyed path inserts the row itself.
    task = Task(
        id=uuid.uuid4(), user_id=user_id, model=spec.name, device=request.device, queue=None,
        status=TaskStatus.CREATED.value, status_reason=None, error=None,
        params=params, batch_size=batch_size, priority=request.priority,
        total_items=len(items), subtask_count=rows, redundancy=redundancy,
        webhook_url=str(request.webhook_url) if request.webhook_url else None,
        max_cost=request.max_cost, estimated_cost=estimate, cost=None, idempotency_key=idempotency_key,
        request_hash=request_hash, trace_id=trace_id, result_key=None, created_at=now, scheduled_at=None,
        started_at=None, finished_at=None, progress_at=now, dispatch_count=0,
    )
    if idempotency_key:
        winner = _insert_keyed(session, task=task, idempotency_key=idempotency_key, request_hash=request_hash)
        if winner is not None:
            return winner, False
        _INSERT_SUBTASKS.execute(session.connection(), {"id": task.id, "now": now, "batches": json.dumps(batches),
                                                        "k": redundancy, "spot": _array(spot)})
        balance = None
    else:  # no key, no race to lose: no savepoint, and the task, its subtasks (and the balance lock) in one statement
        balance = _insert_task(session, task, batches, lock=not big, spot=spot)
    billing.place_hold(session, user_id=user_id, task_id=task.id, amount=estimate, balance=balance)
    emit(
        session,
        type="TaskCreated",
        key=str(task.id),
        payload={"task_id": str(task.id), "user_id": str(user_id), "model": spec.name, "device": request.device,
                 "items": len(items), "subtasks": len(batches), "estimated_cost": str(estimate),
                 "batch_size": batch_size, "priority": request.priority, "idempotency_key": idempotency_key,
                 "trace_id": trace_id, "redundancy": redundancy},
    )
    observability.task_submitted(model=spec.name, task_id=task.id, user_id=user_id)
    # Buffered (audit_pending, chained within seconds) in the same transaction: chaining here
    # would take the chain's global lock and serialize every submit of every user.
    audit.enqueue(
        session, actor=f"user:{user_id}", action="task.created", subject=f"task:{task.id}", task_id=task.id,
        data={"model": spec.name, "device": request.device, "items": len(items), "subtasks": len(batches),
              "estimated_cost": str(estimate), "schedule_id": schedule_message_id(task.id),
              **({"redundancy": redundancy} if redundancy > 1 else {}), **({"spot_checks": spot} if spot else {})},
    )
    return task, True


def _redundancy(session: Session, *, user_id: uuid.UUID, requested: int | None) -> int:
    """The task's redundancy: as requested, at least the operator's and the user's minimum;
    absent, that minimum. Asking for less is refused, naming the field."""
    minimum = get_settings().min_redundancy
    if requested is None or requested < 5:  # the user's own policy, read only where it can matter
        own = session.scalar(select(User.min_redundancy).where(User.id == user_id))
        minimum = max(minimum, own or 1)
    if requested is None:
        return minimum
    if requested < minimum:
        raise InvalidInput.field("redundancy", f"at least {minimum} (the minimum your account's policy sets)")
    return requested


def spot_checks(batches: int, *, redundancy: int) -> list[int]:
    """Indices of a redundancy-1 task's batches that also run on a second node, at the platform's
    cost (`MARKETPLACE_SPOT_CHECK_RATE`): a node that returns wrong outputs loses its standing."""
    rate = get_settings().spot_check_rate
    if redundancy > 1 or rate <= 0:
        return []
    return [i for i in range(batches) if _random.random() < rate]


def _array(values: list[int]) -> str:
    return "{" + ",".join(str(v) for v in values) + "}"


# Task :id's subtasks: :k replicas (rows) of each batch of the JSON array :batches, in index order,
# and one more, at the platform's cost, of each batch whose index is in :spot (spot checks).
_SUBTASKS_SQL = f"""
    INSERT INTO subtasks (id, task_id, index, replica, platform_paid, status, inputs, items, attempts, created_at)
    SELECT gen_random_uuid(), :id, CAST(ord AS integer) - 1, r, r >= :k, '{SubTaskStatus.PENDING.value}', batch,
           jsonb_array_length(batch), 0, :now
    FROM jsonb_array_elements(:batches) WITH ORDINALITY AS b(batch, ord)
    CROSS JOIN LATERAL generate_series(0, CASE WHEN CAST(ord AS integer) - 1 = ANY(CAST(:spot AS integer[]))
                                               THEN :k ELSE :k - 1 END) AS r
"""
_SUBTASK_TYPES = {"id": "uuid", "now": "timestamptz", "batches": "jsonb", "k": "integer", "spot": "text"}
_INSERT_SUBTASKS = Prepared("mp_insert_subtasks", _SUBTASKS_SQL, types=_SUBTASK_TYPES)
# A submit's task row and its subtasks in one round trip, which also takes `place_hold`'s lock on
# the user's balance and reads it. It was the ORM's flush of the task (~0.45 ms of Python), an
# executemany of the subtasks and the lock: three round trips. The lock is taken before the
# foreign key's KEY SHARE on the same row (checked at the statement's end); both are this
# transaction's and FOR NO KEY UPDATE does not conflict with a KEY SHARE (see billing.service).
# The lock comes first (the rows' CTEs run after the statement's own SELECT) and is held through
# the insert: a big submit's rows go in by `_INSERT_TASK_ROWS`, and `place_hold` locks after them.
def _insert_task_sql(*, lock: bool) -> str:
    return f"""
    WITH t AS (
        INSERT INTO tasks (id, user_id, model, device, status, params, batch_size, priority, total_items,
                           subtask_count, redundancy, webhook_url, max_cost, estimated_cost, request_hash, trace_id,
                           created_at, progress_at, dispatch_count)
        VALUES (:id, :user_id, :model, :device, '{TaskStatus.CREATED.value}', :params, :batch_size, :priority,
                :total_items, :subtask_count, :k, :webhook_url, :max_cost, :estimated_cost, :request_hash,
                :trace_id, :now, :now, 0)
    ), s AS ({_SUBTASKS_SQL})
    {billing.lock_balance_sql("user_id") if lock else "SELECT NULL"}
"""


_TASK_TYPES = {**_SUBTASK_TYPES, "user_id": "uuid", "model": "text", "device": "text", "params": "jsonb",
               "batch_size": "integer", "priority": "integer", "total_items": "integer", "subtask_count": "integer",
               "webhook_url": "text", "max_cost": "numeric", "estimated_cost": "numeric", "request_hash": "text",
               "trace_id": "text"}
_INSERT_TASK = Prepared("mp_insert_task", _insert_task_sql(lock=True), types=_TASK_TYPES)
_INSERT_TASK_ROWS = Prepared("mp_insert_task_rows", _insert_task_sql(lock=False), types=_TASK_TYPES)


def _insert_task(session: Session, task: Task, batches: list[list[Any]], *, lock: bool = True,
                 spot: list[int] | None = None) -> Decimal | None:
    """Insert `task` (every column set) and its subtasks; `task` becomes persistent in `session`.

    `lock`: returns the user's balance, locked for `billing.place_hold`; else None, and
    `place_hold` takes the lock itself."""
    session.flush()  # what session.execute would do first
    balance = (_INSERT_TASK if lock else _INSERT_TASK_ROWS).execute(session.connection(), {
        "id": task.id, "user_id": task.user_id, "model": task.model, "device": task.device,
        "params": json.dumps(task.params), "batch_size": task.batch_size, "priority": task.priority,
        "total_items": task.total_items, "subtask_count": task.subtask_count, "webhook_url": task.webhook_url,
        "max_cost": task.max_cost, "estimated_cost": task.estimated_cost, "request_hash": task.request_hash,
        "trace_id": task.trace_id, "now": task.created_at, "batches": json.dumps(batches),
        "k": task.redundancy, "spot": _array(spot or []),
    }).scalar_one()
    # As if loaded: in the session's identity map, nothing left for its flush to write.
    make_transient_to_detached(task)
    session.add(task)
    return balance


def _insert_keyed(session: Session, *, task: Task, idempotency_key: str, request_hash: str) -> Task | None:
    """Insert a keyed task; returns the winner's task when a concurrent request took the key first."""
    try:
        # A savepoint: a concurrent duplicate (same user and key) loses on the unique
        # constraint and gets the winner's task, without spoiling the outer transaction.
        with session.begin_nested():
            session.add(task)
            session.flush()
    except IntegrityError:
        existing = _keyed_task(session, user_id=task.user_id, idempotency_key=idempotency_key,
                               request_hash=request_hash)
        if existing is None:
            raise
        return existing
    return None


def _keyed_task(session: Session, *, user_id: uuid.UUID, idempotency_key: str, request_hash: str) -> Task | None:
    """The user's task stored under this key, if any; Conflict when it was stored for another body."""
    existing = session.scalar(select(Task).where(Task.user_id == user_id, Task.idempotency_key == idempotency_key))
    if existing is not None and existing.request_hash != request_hash:
        raise Conflict("Idempotency-Key was already used with a different request body", field="Idempotency-Key")
    return existing


AUDITED_HEADER = "marketplace_audited"


def schedule_message_id(task_id: uuid.UUID | str) -> str:
    """The broker id of a task's first scheduling message (named in its `task.created` record)."""
    return f"{task_id}:schedule"


def schedule_accepted(task_id: uuid.UUID, model: str) -> bool:
    """Send a just-committed task's first `schedule` message; False when the broker could not
    take it.

    The task is durable by now, with its hold: answering 503 would have the client send it
    again, a second task. So a broker that is down here leaves it `Created`, and recovery
    (`maintenance.recover`) sends the message once the task has sat past
    `recovery_stall_seconds`."""
    from marketplace.infra.celery_app import send_or_leave_to_recovery

    return send_or_leave_to_recovery(
        names.SCHEDULE, schedule_message_id(task_id),
        lambda: enqueue_schedule(task_id, first=True, model=model),
        what=f"task {task_id} accepted, but its schedule message")


def enqueue_schedule(
    task_id: uuid.UUID | str, *, countdown: float | None = None, first: bool = False, model: str | None = None
) -> None:
    """Publish the scheduling step; call only after the task's transaction committed.

    `first`: the message that follows `create_task`. Its `task.created` audit record, written
    in the submit's transaction, already names it, so the publish signal writes no record of
    its own (that was a second transaction per submit). `model`, when the caller has the row:
    the scheduler reads the nodes' capacity for it without a transaction of its own first.
    """
    from marketplace.infra.celery_app import app

    app.send_task(names.SCHEDULE, args=[str(task_id)], kwargs={"model": model} if model else None,
                  queue=names.SCHEDULER_QUEUE, countdown=countdown,
                  ignore_result=True, task_id=schedule_message_id(task_id) if first else None,
                  headers={AUDITED_HEADER: "task.created"} if first else None)


def get_task(session: Session, *, task_id: uuid.UUID | str, user: User | None = None, lock: bool = False) -> Task:
    """A task visible to `user` (its owner or an admin); anyone else gets NotFound, never 403."""
    if not str(task_id):  # a gRPC request that left the field out
        raise InvalidInput.field("task_id", "required")
    try:
        tid = uuid.UUID(str(task_id))
    except ValueError as exc:
        raise NotFound(f"task {task_id} not found") from exc
    stmt = select(Task).where(Task.id == tid)
    if lock:  # the locked row's values, not those of an object the session already holds
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    task = session.scalar(stmt)
    if task is None or (user is not None and not user.is_admin and task.user_id != user.id):
        raise NotFound(f"task {task_id} not found")
    return task


def progress_of(session: Session, *, task_ids: list[uuid.UUID]) -> dict[uuid.UUID, dict[str, int]]:
    rows = session.execute(
        select(SubTask.task_id, SubTask.status, func.count())
        .where(SubTask.task_id.in_(task_ids))
        .group_by(SubTask.task_id, SubTask.status)
    )
    out: dict[uuid.UUID, dict[str, int]] = {tid: {} for tid in task_ids}
    for tid, status, n in rows:
        out[tid][status] = n
    return out


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def task_links(task_id: uuid.UUID | str) -> dict[str, str]:
    base = f"/v1/tasks/{task_id}"
    return {"self": base, "subtasks": f"{base}/subtasks", "result": f"{base}/result", "cancel": f"{base}/cancel"}


def task_document(task: Task, counts: dict[str, int], *, running_cost: Decimal | None = None,
                  waiting: tuple[int, int] | None = None) -> TaskOut:
    cost = task.cost if task.cost is not None else running_cost
    links = task_links(task.id)
    if TaskStatus(task.status).final:  # its completion record, proven against a signed checkpoint
        links["receipt"] = f"{links['self']}/receipt"
    return TaskOut(
        id=str(task.id),
        status=task.status,  # type: ignore[arg-type]
        model=task.model,
        device=task.device,
        queue=task.queue,
        priority=task.priority,
        progress=Progress(
            done=counts.get(SubTaskStatus.DONE.value, 0),
            failed=counts.get(SubTaskStatus.FAILED.value, 0),
            total=task.subtask_count,
        ),
        total_items=task.total_items,
        subtasks=task.subtask_count,
        redundancy=task.redundancy or 1,
        estimated_cost=str(task.estimated_cost),
        cost=str(cost) if cost is not None else None,
        created_at=task.created_at.isoformat(),
        scheduled_at=_iso(task.scheduled_at),
        started_at=_iso(task.started_at),
        finished_at=_iso(task.finished_at),
        error=task.error,
        status_reason=task.status_reason or (_slot_reason(task.queue, *waiting) if waiting else None),
        queue_position=waiting[0] if waiting else None,
        trace_id=task.trace_id,
        links=links,
    )


def _slot_reason(queue: str | None, ahead: int, users: int) -> str:
    return f"waiting for a {queue} slot: {ahead} subtask{'s' if ahead != 1 else ''} of {users} user{'s' if users != 1 else ''} ahead of yours"


# A task with nothing running or sent, and subtasks waiting for the fair dispatcher: how many start
# before its next one, about. Those already sent to the queue go first; then, each round, every
# other user with work waiting gets about one (equal shares: see scheduling/fair.py), and the
# owner's own tasks that come first in its order (priority, then age) go before this one.
_WAITING = text("""
    WITH me AS (
        SELECT id, user_id, queue, priority, created_at FROM tasks WHERE id = :id AND backlog > 0
          AND NOT EXISTS (SELECT 1 FROM subtasks s WHERE s.task_id = tasks.id
                          AND (s.status = 'Running' OR (s.status = 'Pending' AND s.dispatches > 0)))
    ), active AS (
        SELECT t.* FROM tasks t, me WHERE t.queue = me.queue AND t.status IN ('Scheduled', 'InProgress')
    )
    SELECT (SELECT count(*) FROM active a JOIN subtasks s ON s.task_id = a.id
             WHERE s.status = 'Pending' AND s.dispatches > 0) AS sent,
           (SELECT COALESCE(sum(a.backlog), 0) FROM active a, me WHERE a.user_id = me.user_id AND a.id <> me.id
              AND (a.priority > me.priority OR (a.priority = me.priority AND a.created_at < me.created_at))) AS own,
           (SELECT count(DISTINCT a.user_id) FROM active a, me WHERE a.user_id <> me.user_id
              AND (a.backlog > 0 OR EXISTS (SELECT 1 FROM subtasks s WHERE s.task_id = a.id
                                            AND s.status IN ('Pending', 'Running')))) AS others
    FROM me
""")


def waiting_for_slot(session: Session, *, task: Task) -> tuple[int, int] | None:
    """(subtasks ahead, users ahead) of a task that waits for a slot, or None when it does not."""
    if task.status not in (TaskStatus.SCHEDULED.value, TaskStatus.IN_PROGRESS.value) or not task.backlog:
        return None
    row = session.execute(_WAITING, {"id": task.id}).first()
    if row is None:
        return None
    others = int(row.others)
    ahead = int(row.sent) + int(row.own) + others
    # Nothing ahead: it is being released now (assigned a moment ago), or waits only for a slot
    # to free up; no reason to show.
    return (ahead, others + (1 if row.own else 0)) if ahead else None


def describe_task(session: Session, *, task: Task) -> TaskOut:
    counts = progress_of(session, task_ids=[task.id])[task.id]
    running = None if task.cost is not None else billing.task_charges(session, task_id=task.id)
    return task_document(task, counts, running_cost=running, waiting=waiting_for_slot(session, task=task))


def list_subtasks(session: Session, *, task: Task, status: str | None = None, after: int = -1,
                  limit: int | None = None) -> list[SubTaskOut]:
    """The task's subtasks in index order: those after index `after`, in `status`, at most `limit`
    (a job of 200,000 one-item subtasks is a page at a time, not one 50 MB answer)."""
    query = select(SubTask).where(SubTask.task_id == task.id, SubTask.index > after, SubTask.replica == 0)
    if status is not None:
        query = query.where(SubTask.status == status)
    rows = list(session.scalars(query.order_by(SubTask.index).limit(limit)))
    replicas: dict[int, list[SubTask]] = {}
    if rows and task.subtask_count > _chunk_count(task.total_items, task.batch_size):  # replicas: one list each
        for r in session.scalars(select(SubTask).where(SubTask.task_id == task.id, SubTask.replica > 0,
                                                       SubTask.index.in_([s.index for s in rows]))):
            replicas.setdefault(r.index, []).append(r)
    providers = _providers(session, [r.worker for s in rows for r in [s, *replicas.get(s.index, [])] if r.worker]
                           ) if replicas else {}
    out = []
    for s in rows:
        runs = sorted([s, *replicas.get(s.index, [])], key=lambda r: r.replica)
        shown = next((r for r in runs if r.agreed), s)  # the accepted run, once judged
        out.append(SubTaskOut(
            id=str(s.id), index=s.index, status=shown.status, items=s.items, worker=shown.worker,  # type: ignore[arg-type]
            attempts=shown.attempts, seconds=shown.seconds, error=shown.error,
            started_at=_iso(shown.started_at), finished_at=_iso(shown.finished_at),
            replicas=[ReplicaOut(id=str(r.id), replica=r.replica, status=r.status, node=r.worker,
                                 provider=providers.get(r.worker or ""), output_sha256=r.result_sha256,
                                 agreed=r.agreed, platform_paid=r.platform_paid) for r in runs] if len(runs) > 1 else None,
        ))
    return out


def _providers(session: Session, hostnames: list[str]) -> dict[str, str]:
    """{hostname: provider user id} of the enrolled nodes among `hostnames`."""
    if not hostnames:
        return {}
    rows = session.execute(text("SELECT hostname, provider_id FROM nodes WHERE hostname = ANY(:names)"),
                           {"names": sorted(set(hostnames))})
    return {h: str(p) for h, p in rows}


def subtask_page(session: Session, *, task: Task, status: str | None = None, after: int = -1,
                 limit: int | None = None) -> SubTaskList:
    """`list_subtasks` as a page: `next_after` is the last index when more follow."""
    subs = list_subtasks(session, task=task, status=status, after=after, limit=None if limit is None else limit + 1)
    more = limit is not None and len(subs) > limit
    if more:
        subs = subs[:limit]
    return SubTaskList(task_id=str(task.id), subtasks=subs, next_after=subs[-1].index if more else None)

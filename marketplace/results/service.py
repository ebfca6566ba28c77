"""Result Aggregator: combine partial results in input order and finish the task."""
from __future__ import annotations

import json
import logging
import uuid
from typing import Any, NamedTuple

import pydantic_core
from sqlalchemy import bindparam, func, literal_column, select
from sqlalchemy.dialects.postgresql import JSON, aggregate_order_by
from sqlalchemy.orm import Session

from marketplace import observability
from marketplace.audit import service as audit
from marketplace.billing import service as billing
from marketplace.billing.models import LedgerEntry
from marketplace.catalog import get_catalog
from marketplace.events.outbox import emit
from marketplace.infra.db import session_scope, utcnow
from marketplace.infra.storage import get_store
from marketplace.tasks.models import SubTask, SubTaskStatus, Task, TaskStatus

logger = logging.getLogger(__name__)
FINAL_SUBTASK = (SubTaskStatus.DONE.value, SubTaskStatus.FAILED.value)
WEBHOOK_TASK = "marketplace.webhooks.deliver"


def part_key(task_id: str, index: int) -> str:
    return f"results/{task_id}/parts/{index}.json"


def result_key(task_id: str) -> str:
    return f"results/{task_id}/result.json"


def encode_part(outputs: list[Any]) -> bytes:
    """A part's JSON, compact, non-ASCII escaped and NaN written as `json.dumps` writes them.

    pydantic-core's encoder: an embedding part (64 x 384 floats) took 5.7 ms in `json.dumps`
    and takes 1.1 here, ~2% of the subtask. Floats keep their shortest round-trip digits
    (`1e-7` where `json.dumps` writes `1e-07`: the same number). What it cannot write (a lone
    surrogate, which JSON input may carry; a type it does not know) goes to `json.dumps`, which
    writes or refuses it as it always did."""
    try:
        return pydantic_core.to_json(outputs, ensure_ascii=True, inf_nan_mode="constants")
    except pydantic_core.PydanticSerializationError:
        return json.dumps(outputs, separators=(",", ":")).encode()


def _finish(
    session: Session, *, task: Task, status: TaskStatus, error: str | None = None, failed: int | None = None,
    charged: bool = False,
) -> None:
    """Set a final status, settle billing and emit the event, in the caller's transaction.

    `failed` is the number of failed subtasks when the caller already knows it; `charged`, that
    every subtask that ran already has its charge (nothing for backfill to look for). The
    records go to `audit_pending` (chained within seconds, and before any audit read):
    chaining here would take the chain's global lock inside every task's last step.
    """
    with session.no_autoflush:  # the task row is written once, at commit, not once per query below
        _settle_and_emit(session, task=task, status=status, error=error, failed=failed, charged=charged)


def _settle_and_emit(
    session: Session, *, task: Task, status: TaskStatus, error: str | None, failed: int | None, charged: bool
) -> None:
    task.status = status.value
    task.error = error
    task.status_reason = None
    task.finished_at = utcnow()
    # The hold first, FOR UPDATE: a subtask's charge (hold FOR SHARE, then its ledger row) then
    # either committed before or waits for settlement; taken after backfill's ledger insert, the
    # two could wait on each other (deadlock, 1 s until Postgres breaks it).
    billing.lock_hold(session, task_id=task.id)
    if not charged:
        billing.backfill_charges(session, task=task, spec=get_catalog().get(task.model), hold_locked=True)
    billing.settle_task(session, task=task, hold_locked=True)
    audit.enqueue(session, actor=f"user:{task.user_id}" if status == TaskStatus.CANCELLED else "system",
                  action=f"task.{status.value.lower()}", subject=f"task:{task.id}", task_id=task.id,
                  data={"user_id": str(task.user_id), "status": status.value, "cost": str(task.cost), "error": error})
    observability.task_finished(model=task.model, status=task.status, cost=task.cost)
    event = {TaskStatus.DONE: "TaskCompleted", TaskStatus.FAILED: "TaskFailed"}.get(status, "TaskCancelled")
    if failed is None:
        failed = session.scalar(select(func.count()).select_from(SubTask).where(
            SubTask.task_id == task.id, SubTask.status == SubTaskStatus.FAILED.value))
    emit(session, type=event, key=str(task.id), payload={
        "task_id": str(task.id), "user_id": str(task.user_id), "model": task.model, "status": task.status,
        "cost": str(task.cost), "error": error, "result_key": task.result_key, "items": task.total_items,
        "subtasks": task.subtask_count, "failed_subtasks": failed,
        "seconds": round((task.finished_at - (task.started_at or task.created_at)).total_seconds(), 6),
    })
    if task.webhook_url:  # sent after the commit; recovery re-sends it if it is lost on the way
        task.webhook_sent_at = task.finished_at
        session.info.setdefault("after_commit", []).append(("webhook", str(task.id)))


def fail_task(session: Session, *, task: Task, error: str) -> None:
    """End a task `Failed` with a reason (subtask failure, schedule timeout, recovery)."""
    if TaskStatus(task.status).final:
        return
    _finish(session, task=task, status=TaskStatus.FAILED, error=error)


def cancel_task(session: Session, *, task: Task) -> None:
    _finish(session, task=task, status=TaskStatus.CANCELLED, error="cancelled by the user")


def run_after_commit(actions: list[tuple[str, str]]) -> None:
    """Side effects that must wait for the commit (webhook delivery)."""
    from marketplace.infra.celery_app import app

    for kind, task_id in actions:
        if kind == "webhook":
            send_webhook(app, task_id)


def send_webhook(app: Any, task_id: str) -> bool:
    """Queue a webhook's delivery. The task's final status is committed: a broker that is down
    now must not fail the step that finished it (a subtask would retry a finished task and the
    delivery would still be lost); recovery re-sends it (`maintenance.resend_lost_webhooks`)."""
    from marketplace.infra.celery_app import send_or_leave_to_recovery

    message_id = str(uuid.uuid4())
    return send_or_leave_to_recovery(
        WEBHOOK_TASK, message_id,
        lambda: app.send_task(WEBHOOK_TASK, args=[task_id], queue="marketplace.maintenance", ignore_result=True,
                              task_id=message_id),
        what=f"webhook for task {task_id}")


def join_parts(task_id: str, model: str, parts: Any, store: Any) -> bytes:
    """The result document, spliced from the parts' JSON arrays in index order.

    Parts are never parsed: a large embedding job's outputs are millions of floats,
    and re-encoding them cost more than computing them. Each part's sha256 is checked
    against the one recorded when it was written.
    """
    parts = list(parts)
    chunks = [_part_body(task_id, part, data)
              for part, data in zip(parts, store.get_many([part.result_key for part in parts]), strict=True)]
    return _head(task_id, model) + b',"outputs":[' + b",".join(c for c in chunks if c) + b"]}"


def partial_document(task: Task, subtasks: list[Any], store: Any) -> bytes:
    """What a task that is not Done has so far, in the result's shape: the Done subtasks' outputs
    in input order and `null` for each item of the others, which `missing` lists (index, first
    item, item count, status, error). `subtasks`: (index, items, status, result_key, result_sha256,
    error) in index order. Spliced like `join_parts`."""
    done = [s for s in subtasks if s.status == SubTaskStatus.DONE.value and s.result_key]
    bodies = {s.index: _part_body(str(task.id), s, data)
              for s, data in zip(done, store.get_many([s.result_key for s in done]), strict=True)}
    chunks: list[bytes] = []
    missing: list[dict[str, Any]] = []
    first = 0
    for sub in subtasks:
        if sub.index in bodies:
            chunks.append(bodies[sub.index])
        else:
            chunks.append(b",".join([b"null"] * sub.items))
            missing.append({"index": sub.index, "first_item": first, "items": sub.items, "status": sub.status,
                            "error": sub.error})
        first += sub.items
    return (_head(str(task.id), task.model) + b',"outputs":[' + b",".join(c for c in chunks if c) + b"]"
            + partial_fields(task.status, missing))


def partial_fields(status: str, missing: list[dict[str, Any]]) -> bytes:
    """`,"status":...,"complete":...,"missing":[...]}`: what a partial result adds, closing brace included."""
    fields = json.dumps({"status": status, "complete": not missing, "missing": missing}, separators=(",", ":"))
    return b"," + fields[1:].encode()


def _head(task_id: str, model: str) -> bytes:
    """`{"task_id":...,"model":...` without its closing brace."""
    return json.dumps({"task_id": task_id, "model": model}, separators=(",", ":"))[:-1].encode()


def _part_body(task_id: str, part: Any, data: bytes) -> bytes:
    """A part's items without the array's brackets, after its sha256 is checked."""
    from marketplace.infra.storage import StorageError, sha256_hex

    if part.result_sha256 and sha256_hex(data) != part.result_sha256:
        raise StorageError(f"part {part.index} of task {task_id} does not match its recorded sha256")
    return data.strip()[1:-1].strip()  # a JSON array written by workers.runner


class Part(NamedTuple):
    index: int
    status: str
    result_key: str | None
    result_sha256: str | None
    error: str | None
    charged: bool  # it has its ledger row, or it never ran (nothing to charge)


# The task row, locked, with its subtasks' outcomes in index order: one round trip where there
# were two, and a statement built once. Whether each subtask is charged: it usually is (a success
# is charged by the statement that records it), and then settlement need not look for uncharged
# ones; ledger rows are never deleted, so one seen here is there after the hold's lock too.
_PARTS = (
    select(func.coalesce(
        func.json_agg(aggregate_order_by(func.json_build_array(
            SubTask.index, SubTask.status, SubTask.result_key, SubTask.result_sha256, SubTask.error,
            select(LedgerEntry.id).where(LedgerEntry.task_id == SubTask.task_id, LedgerEntry.subtask_id == SubTask.id)
            .exists() | (SubTask.attempts == 0),
        ), SubTask.index)),
        literal_column("'[]'::json"), type_=JSON,
    ))
    .where(SubTask.task_id == Task.id)
    .scalar_subquery()
)
_LOCK_WITH_PARTS = select(Task, _PARTS).where(Task.id == bindparam("task_id")).with_for_update(of=Task)


def finalize_task(task_id: str) -> str:
    """Finish the task if every subtask is final: `done`, `failed`, `waiting` or `noop`."""
    actions: list[tuple[str, str]] = []
    with session_scope() as session:
        row = session.execute(_LOCK_WITH_PARTS, {"task_id": uuid.UUID(task_id)}).first()
        task = row[0] if row else None
        if task is None or TaskStatus(task.status).final:
            return "noop"
        subs = [Part(*values) for values in row[1]]
        if any(s.status not in FINAL_SUBTASK for s in subs):
            return "waiting"
        failed = [s for s in subs if s.status == SubTaskStatus.FAILED.value]
        all_charged = all(s.charged for s in subs)
        if failed:
            first = failed[0]
            _finish(session, task=task, status=TaskStatus.FAILED, error=f"subtask {first.index} failed: {first.error}",
                    failed=len(failed), charged=all_charged)
            outcome = "failed"
        else:
            key = result_key(task_id)
            store = get_store()
            store.put_bytes(key, join_parts(task_id, task.model, subs, store), "application/json")
            task.result_key = key
            _finish(session, task=task, status=TaskStatus.DONE, failed=0, charged=all_charged)
            outcome = "done"
        actions = session.info.pop("after_commit", [])
    run_after_commit(actions)
    return outcome


def save_partial(
    *, task_id: str, index: int, outputs: list[Any], error: str | None, seconds: float, worker: str
) -> dict[str, Any]:
    """Store one subtask's outputs from outside Celery (gRPC `SavePartial`), exactly as
    `workers.run_subtask` would: deterministic part key, the row's outcome, SubTaskCompleted.
    The charge is recorded from the row when the task is finalized (`backfill_charges`)."""
    import uuid as _uuid

    from marketplace.infra.errors import Conflict, InvalidInput, NotFound
    from marketplace.infra.storage import get_store
    from marketplace.tasks import progress

    with session_scope() as session:
        sub = session.scalar(select(SubTask).where(SubTask.task_id == _uuid.UUID(task_id), SubTask.index == index))
        if sub is None:
            raise NotFound(f"subtask {index} of task {task_id} not found")
        subtask_id, items = str(sub.id), sub.items
    early, _work = progress.claim_subtask(subtask_id, hostname=worker or "grpc")
    if early is not None:
        raise Conflict(f"subtask {index} of task {task_id} is already final ({early.get('error') or 'Done'})")
    seconds = round(max(0.0, float(seconds)), 6)
    if error:
        run_after_commit(progress.fail_subtask(subtask_id, error=error, seconds=seconds, index=index))
        return {"key": "", "sha256": "", "items": items}
    if len(outputs) != items:
        progress.release_subtask(subtask_id, error=f"SavePartial sent {len(outputs)} outputs for {items} items")
        raise InvalidInput.field("outputs", f"expected {items} outputs for subtask {index}, got {len(outputs)}")
    key = part_key(task_id, index)
    sha = get_store().put_bytes(key, encode_part(outputs), "application/json")
    progress.complete_subtask(subtask_id, key=key, sha256=sha, seconds=seconds)
    return {"key": key, "sha256": sha, "items": items}

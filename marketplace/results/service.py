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

from marketplace.audit import service as audit
from marketplace.infra.after_commit import defer
from marketplace.infra.db import session_scope, utcnow
from marketplace.infra.errors import Conflict
from marketplace.infra.storage import get_store
from marketplace.results import quorum
from marketplace.tasks import lifecycle
from marketplace.tasks.models import FINAL_SUBTASK_STATUSES, SubTask, SubTaskStatus, Task, TaskStatus

logger = logging.getLogger(__name__)
FINAL_SUBTASK = tuple(s.value for s in FINAL_SUBTASK_STATUSES)


def part_key(task_id: str, index: int, replica: int = 0) -> str:
    """A run's part: `<index>.json`, and `<index>.r<replica>.json` for a batch's other replicas."""
    return f"results/{task_id}/parts/{index}.json" if not replica else f"results/{task_id}/parts/{index}.r{replica}.json"


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
    replica: int = 0
    worker: str | None = None
    id: str | None = None


# The task row, locked, with its subtasks' outcomes in index order: one round trip where there
# were two, and a statement built once.
_PARTS = (
    select(func.coalesce(
        func.json_agg(aggregate_order_by(func.json_build_array(
            SubTask.index, SubTask.status, SubTask.result_key, SubTask.result_sha256, SubTask.error,
            SubTask.replica, SubTask.worker, SubTask.id,
        ), SubTask.index)),
        literal_column("'[]'::json"), type_=JSON,
    ))
    .where(SubTask.task_id == Task.id)
    .scalar_subquery()
)
_LOCK_WITH_PARTS = select(Task, _PARTS).where(Task.id == bindparam("task_id")).with_for_update(of=Task)


def finalize_task(task_id: str) -> str:
    """Finish the task if every subtask is final: `done`, `failed`, `waiting` or `noop`.

    The one way a task ends Done: the parts are joined in input order into its result, then
    `lifecycle.finish`. Whoever sees a task's last subtask end calls it (its node, inline for a
    small task; a `marketplace.results.finalize` message for a big one; recovery); the task's
    row lock makes the first of them do it and the others find it final."""
    with session_scope() as session:
        row = session.execute(_LOCK_WITH_PARTS, {"task_id": uuid.UUID(task_id)}).first()
        task = row[0] if row else None
        if task is None or TaskStatus(task.status).final:
            return "noop"
        subs = [Part(*values) for values in row[1]]
        if any(s.status not in FINAL_SUBTASK for s in subs):
            return "waiting"
        failed = [s for s in subs if s.status == SubTaskStatus.FAILED.value]
        if failed:  # its failing subtask failed the task already; a task failed otherwise ends here
            first = failed[0]
            lifecycle.fail_task(session, task=task, error=f"subtask {first.index} failed: {first.error}")
            return "failed"
        store = get_store()
        if task.redundancy > 1 or len(subs) > _batches(subs):  # replicas (redundancy, spot checks): a quorum each
            runs = [s for s in subs if s.status == SubTaskStatus.DONE.value]  # not a dropped spot check
            verdict = quorum.judge(model=task.model, redundancy=task.redundancy, runs=runs, store=store)
            if verdict.failed:
                index, reason = min(verdict.failed.items())
                lifecycle.fail_task(session, task=task, error=reason)
                return "failed"
            stuck = quorum.without_tiebreaker(verdict, queue=task.queue, model=task.model)
            if stuck:  # no live node may run the extra replica: say why now, rather than wait
                lifecycle.fail_task(session, task=task, error=stuck)
                return "failed"
            if verdict.more:
                quorum.add_replicas(session, task=task, more=verdict.more, now=utcnow())
                defer(session, _release, task.queue)
                return "waiting"
            quorum.record(session, task=task, verdict=verdict)
            subs = [verdict.accepted[i] for i in sorted(verdict.accepted)]
        key = result_key(task_id)
        store.put_bytes(key, join_parts(task_id, task.model, subs, store), "application/json")
        task.result_key = key
        lifecycle.finish(session, task=task, status=TaskStatus.DONE, failed=0)
    return "done"


def _batches(subs: list[Part]) -> int:
    """How many batches the runs are of (the last index + 1: runs come in index order)."""
    return subs[-1].index + 1 if subs else 0


def _release(queue: str | None) -> None:
    """After extra replicas were queued: the fair dispatcher sends them (else its beat does)."""
    if not queue:
        return
    try:
        from marketplace.scheduling.dispatch import release_queue

        release_queue(queue, wait=False)
    except Exception:
        logger.warning("could not release the extra replicas on %s", queue, exc_info=True)


def save_partial(
    *, task_id: str, index: int, outputs: list[Any], error: str | None, seconds: float, worker: str
) -> dict[str, Any]:
    """Store one subtask's outputs from outside Celery (gRPC `SavePartial`), exactly as
    `workers.run_subtask` would: the same doors, the same deterministic part key."""
    from marketplace.infra.errors import InvalidInput, NotFound

    with session_scope() as session:
        sub = session.scalar(select(SubTask).where(SubTask.task_id == uuid.UUID(task_id), SubTask.index == index,
                                                   SubTask.replica == 0))
        if sub is None:
            raise NotFound(f"subtask {index} of task {task_id} not found")
        subtask_id, items = str(sub.id), sub.items
    node = worker or "grpc"
    early, work = lifecycle.claim(subtask_id, node=node)
    if early is not None or work is None:
        raise Conflict(f"subtask {index} of task {task_id} is already final ({(early or {}).get('error') or 'Done'})")
    seconds = round(max(0.0, float(seconds)), 6)
    if error:
        lifecycle.fail(work, node=node, error=error, seconds=seconds)
        return {"key": "", "sha256": "", "items": items}
    if len(outputs) != items:
        lifecycle.retry(subtask_id, error=f"SavePartial sent {len(outputs)} outputs for {items} items")
        raise InvalidInput.field("outputs", f"expected {items} outputs for subtask {index}, got {len(outputs)}")
    key = part_key(task_id, index)
    sha = get_store().put_bytes(key, encode_part(outputs), "application/json")
    recorded = lifecycle.complete(work, node=node, key=key, sha256=sha, seconds=seconds)
    if recorded.last:
        finalize_task(task_id)
    return {"key": key, "sha256": sha, "items": items}


def read_result(session: Session, *, task: Task) -> bytes:
    """The stored result document (JSON bytes); Conflict unless the task is Done."""
    if task.status != TaskStatus.DONE.value or not task.result_key:
        raise Conflict(f"task {task.id} is {task.status}; results exist only for Done tasks", task_status=task.status)
    audit.record(actor=f"user:{task.user_id}", action="task.result_downloaded", subject=f"task:{task.id}",
                 task_id=task.id, data={"result_key": task.result_key}, pending=True)
    return get_store().get_bytes(task.result_key)


def read_partial_result(session: Session, *, task: Task) -> bytes:
    """The outputs a task has, whatever its status, with `status`, `complete` and `missing`: a
    Failed or Cancelled job's finished subtasks were charged, and their outputs are the user's.
    A Done task's is its stored result, complete."""

    audit.record(actor=f"user:{task.user_id}", action="task.result_downloaded", subject=f"task:{task.id}",
                 task_id=task.id, data={"result_key": task.result_key, "partial": True}, pending=True)
    if task.status == TaskStatus.DONE.value and task.result_key:
        stored = get_store().get_bytes(task.result_key).rstrip()
        return stored[:-1] + partial_fields(task.status, [])
    subtasks = session.execute(
        select(SubTask.index, SubTask.items, SubTask.status, SubTask.result_key, SubTask.result_sha256, SubTask.error)
        .where(SubTask.task_id == task.id, SubTask.replica == 0).order_by(SubTask.index)  # one run per batch
    ).all()
    if task.redundancy > 1:  # replicas not judged (the task did not end Done): no verified output, missing
        subtasks = [s._replace(status="Unverified") if s.status == SubTaskStatus.DONE.value else s for s in subtasks]
    return partial_document(task, list(subtasks), get_store())

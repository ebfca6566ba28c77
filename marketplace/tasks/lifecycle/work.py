"""The subtask's doors on a node: claim, complete, retry, fail, stop.

Each is one statement that commits by itself on the common path (`statements`), or one short
transaction where it must decide from the row. They take ids and plain values, never ORM
objects, and return what the caller (`workers.runner`, gRPC `SavePartial`) needs next.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError

import marketplace.tasks.lifecycle.statements as sql
from marketplace.audit.service import pending_values, record_params, take_carried, write_carried
from marketplace.billing import charges
from marketplace.catalog import get_catalog
from marketplace.events.outbox import topic_for
from marketplace.infra.db import autocommit, get_engine, session_scope, utcnow
from marketplace.settings import get_settings
from marketplace.tasks.lifecycle.ends import fail_task, lock_task
from marketplace.tasks.models import FINAL_TASK_STATUSES, SubTaskStatus

logger = logging.getLogger(__name__)

# Seconds past a model's time limit after which a Running subtask is taken as abandoned (Celery
# kills it at its hard limit, the limit + 30 s: scheduling/lost.py); recovery uses the same cutoff.
RUNNING_MARGIN = 60.0
_FINAL_TASK = {s.value for s in FINAL_TASK_STATUSES}


@dataclass
class Work:
    """A claimed subtask: what its node runs, and what its outcome is recorded with."""

    subtask_id: str
    task_id: str
    user_id: str
    model: str
    device: str
    queue: str
    index: int
    items: int
    inputs: list[Any]
    params: dict[str, Any]
    attempts: int
    waited: float | None = None  # seconds from submit to this, the task's first start
    replica: int = 0  # which run of its batch (verified results: 0..k-1, then spot checks and tie-breaks)
    platform_paid: bool = False  # a spot check or a tie-break: not charged to the task's owner

    def outcome(self, **extra: Any) -> dict[str, Any]:
        """The outcome dict `workers.run_subtask` returns (and its audit record is made of)."""
        return {"subtask_id": self.subtask_id, "task_id": self.task_id, "user_id": self.user_id,
                "model": self.model, "device": self.device, "index": self.index, "items": self.items, **extra}


def _work(subtask_id: str, row: Any, attempts: int, first_start_of: datetime | None, now: datetime) -> Work:
    queue = row.queue or "cpu."
    return Work(subtask_id=subtask_id, task_id=str(row.task_id), user_id=str(row.user_id), model=row.model,
                device=queue.split(".", 1)[0], queue=row.queue or "", index=row.index, items=row.items,
                inputs=row.inputs, params=row.params or {}, attempts=attempts,
                waited=(now - first_start_of).total_seconds() if first_start_of else None,
                replica=int(row.replica or 0), platform_paid=bool(row.platform_paid))


def _skipped(subtask_id: str, row: Any, **extra: Any) -> dict[str, Any]:
    queue = row.queue or "cpu."
    return {"subtask_id": subtask_id, "task_id": str(row.task_id), "user_id": str(row.user_id), "model": row.model,
            "device": queue.split(".", 1)[0], "index": row.index, "items": row.items, **extra}


def claim(subtask_id: str, *, node: str, message_id: str | None = None,
          incarnation: str | None = None) -> tuple[dict[str, Any] | None, Work | None]:
    """Pending (or Running under a node process that is gone) -> Running; the task InProgress on its first.

    Returns (an outcome when there is nothing to run: a duplicate, a task that ended, a subtask
    that keeps outliving its time limit (`abandoned`); the work otherwise). `incarnation`: the
    claiming node process's id (`registry.signals.incarnation`), written with the hostname so
    that a successor under the same name knows this claim's process from its own."""
    sid = uuid.UUID(subtask_id)
    now = utcnow()
    carried = take_carried()
    if len(carried) <= 1:  # the common case: one statement, committed by itself
        try:
            with autocommit() as conn:
                row = sql.CLAIM_PENDING.execute(conn, {
                    "id": sid, "worker": node, "inc": incarnation, "mid": message_id, "now": now,
                    "topic": topic_for("TaskStarted"), **record_params("c", carried[0] if carried else None)}).first()
        except IntegrityError:  # another process of this node claimed a replica of the batch at this moment
            row = None
        if row is not None:
            return None, _work(subtask_id, row, row.attempts, row.first_start_of, now)
    try:
        with get_engine().begin() as conn:
            return _claim_checked(conn, sid, subtask_id, node=node, incarnation=incarnation, message_id=message_id,
                                  now=now, carried=carried)
    except IntegrityError:  # the same, on the checked path: this node may not run it now; another may
        return {"ok": False, "skipped": True, "elsewhere": True, "subtask_id": subtask_id,
                "error": f"a replica of this subtask's batch runs on {node}"}, None


def _claim_checked(conn: Any, sid: uuid.UUID, subtask_id: str, *, node: str, incarnation: str | None,
                   message_id: str | None, now: datetime, carried: list[dict[str, Any]]
                   ) -> tuple[dict[str, Any] | None, Work | None]:
    """Redelivery, a copy from recovery, a task that ended: decide from the row, in a transaction."""
    if len(carried) > 1:  # several carried records: the one-statement claim, then the rest beside it
        row = sql.CLAIM_PENDING.execute(conn, {"id": sid, "worker": node, "inc": incarnation, "mid": message_id,
                                               "now": now, "topic": topic_for("TaskStarted"),
                                               **record_params("c", None)}).first()
        if row is not None:
            write_carried(conn, task_id=row.task_id, rows=carried)
            return None, _work(subtask_id, row, row.attempts, row.first_start_of, now)
    row = conn.execute(sql.LOAD, {"id": sid}).first()
    write_carried(conn, task_id=row.task_id if row else None, rows=carried)  # task_prerun's `subtask.started`
    if row is None:
        return {"ok": False, "skipped": True, "subtask_id": None, "error": f"unknown subtask {subtask_id}"}, None
    if row.task_status in _FINAL_TASK:
        return _skipped(subtask_id, row, ok=False, skipped=True, error=f"task is {row.task_status}"), None
    if row.status == SubTaskStatus.DONE.value:  # a redelivery of finished work: report, never re-run
        return _skipped(subtask_id, row, ok=True, duplicate=True, key=row.result_key, sha256=row.result_sha256,
                        seconds=row.seconds), None
    if SubTaskStatus(row.status).final:
        return _skipped(subtask_id, row, ok=False, duplicate=True, error=row.error, seconds=row.seconds), None
    if row.status == SubTaskStatus.PENDING.value:
        refusal = conn.execute(sql.REFUSAL, {"id": sid, "worker": node}).first()
        if refusal.demoted:  # no solo work for a node under the reputation threshold: another node's
            return _skipped(subtask_id, row, ok=False, elsewhere=True, queue=row.queue,
                            error=f"node {node} is demoted: it runs replicas, not solo work"), None
        if refusal.early_check:  # a spot check before its batch's first run: later, or not at all
            return _skipped(subtask_id, row, ok=False, elsewhere=True, queue=row.queue, early_check=True,
                            error=f"spot check of subtask {row.index} before its first run"), None
        if refusal.solo and refusal.disagreed:  # it has disagreed: solo work to better-scored nodes first
            better = _better_free(row, node=node, agreed=refusal.agreed, disagreed=refusal.disagreed)
            if better:
                return _skipped(subtask_id, row, ok=False, elsewhere=True, queue=row.queue, error=(
                    f"node {node} has disagreed: solo work goes to {better}, which scores better and has room")), None
        same_provider = refusal.same_provider and _spread_still(row, redundancy=refusal.redundancy)
        if refusal.sibling_here or same_provider:  # run another batch's, or go elsewhere
            # A spot check (of a redundancy-1 task) goes elsewhere at once, or is dropped: traded
            # for a first run, its check would come back here with each later batch, and each
            # trade scans the task's never-run rows (with one node: every check, to the job's end).
            if refusal.redundancy == 1 or not _swap(conn, sid, task_id=row.task_id, index=row.index, node=node):
                where = node if refusal.sibling_here else f"a node of the provider of {node}"
                return _skipped(subtask_id, row, ok=False, elsewhere=True, queue=row.queue,
                                error=f"a replica of subtask {row.index} already ran on {where}"), None
            row = conn.execute(sql.LOAD, {"id": sid}).first()
    if row.status == SubTaskStatus.RUNNING.value and row.celery_id and row.celery_id != message_id and row.worker:
        # Another message (recovery re-sent the subtask) while a live node still runs the first:
        # let that one finish rather than run the subtask twice at once. The same message coming
        # back is a redelivery after its process died, and runs. So does a copy of one whose node
        # died or restarted under the same name: its claim names a process that is gone (Celery's
        # pool children die with their main process). So does a copy of one that has outlived its
        # hard time limit: nothing runs that any more (its message ended, e.g. with a kill at the
        # limit that left the row Running), however live its node is; but not without end: one
        # that keeps outliving its limit fails with the reason.
        outlived = _outlived(row, now)
        if not outlived and _still_running(row, node=node, incarnation=incarnation):
            return _skipped(subtask_id, row, ok=False, skipped=True, error=f"running on {row.worker}"), None
        if outlived and row.attempts > get_settings().subtask_max_retries:
            limit = get_catalog().time_limit(row.model)
            return _skipped(subtask_id, row, ok=False, abandoned=True, error=(
                f"did not finish within its time limit ({limit:g}s) in {row.attempts} attempts; "
                f"the last ran on {row.worker}")), None
    claimed = conn.execute(sql.CLAIM_ANY, {"id": sid, "worker": node, "inc": incarnation, "mid": message_id,
                                           "now": now, "topic": topic_for("TaskStarted")}).first()
    if claimed is None:  # taken since it was read (another node's claim)
        return _skipped(subtask_id, row, ok=False, elsewhere=True, queue=row.queue,
                        error="claimed elsewhere meanwhile"), None
    # The batch as the claim found it (a swap may have moved it since `LOAD`), with the task's facts.
    return None, _work(subtask_id, _Claimed(row, claimed), claimed.attempts, claimed.first_start_of, now)


class _Claimed:
    """The loaded row's task facts with the claimed row's batch (index, inputs, replica...)."""

    BATCH = ("index", "items", "inputs", "replica", "platform_paid")

    def __init__(self, loaded: Any, claimed: Any) -> None:
        self._loaded, self._claimed = loaded, claimed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._claimed if name in self.BATCH else self._loaded, name)


def _better_free(row: Any, *, node: str, agreed: int, disagreed: int) -> str | None:
    """A live node of the row's queue that scores better than `node` and has room (None: claim here)."""
    from marketplace.scheduling.standing import better_free

    try:
        return better_free(row.queue or "", row.model, node=node, agreed=agreed, disagreed=disagreed)
    except Exception:  # registry or reputation unreadable: run it here rather than not at all
        logger.warning("could not compare node %s with its queue's", node, exc_info=True)
        return None


def _spread_still(row: Any, *, redundancy: int) -> bool:
    """Whether the row's queue still has live nodes of as many providers as the task's redundancy.
    If not, the task's replicas need distinct nodes only (`sql.UNSPREAD`, committed at once): a
    lasting decision, so a cached view that says so is read again first."""
    from marketplace.scheduling.standing import providers

    if providers(row.queue or "") >= redundancy or providers(row.queue or "", fresh=True) >= redundancy:
        return True
    with autocommit() as conn:
        conn.execute(sql.UNSPREAD, {"task_id": row.task_id})
    return False


def _swap(conn: Any, sid: uuid.UUID, *, task_id: Any, index: int, node: str) -> bool:
    """Trade the batch of never-run subtask `sid` (a replica of it ran on `node`) with that of a
    never-run row of the same task that `node` may run; whether it did."""
    if conn.execute(sql.SWAP_LOCK_ME, {"id": sid}).first() is None:
        return False
    other = conn.execute(sql.SWAP_LOCK_OTHER, {"task_id": task_id, "index": index, "worker": node}).scalar()
    if other is None:
        return False
    moved = conn.execute(sql.SWAP, {"id": sid, "other": other}).all()
    if len(moved) != 2:  # never half a swap (the unique key would refuse it too)
        raise IntegrityError("swap", {}, RuntimeError(f"swap of {sid} and {other} moved {len(moved)} rows"))
    return True


def _still_running(row: Any, *, node: str, incarnation: str | None) -> bool:
    """Whether the node process that claimed `row` may still be running it.

    A claim by another process of this very node (same name, another incarnation) was made by a
    predecessor this process replaced: dead, with no registry read (this node's own heartbeat may
    not be written yet when its first messages arrive). Otherwise the registry says: the node's
    heartbeat is current and names the claiming process (`registry.service.claim_alive`)."""
    from marketplace.infra.redis_client import get_redis
    from marketplace.registry.service import claim_alive

    if row.worker == node and row.worker_incarnation and incarnation:
        return bool(row.worker_incarnation == incarnation)
    try:
        return claim_alive(get_redis(), hostname=row.worker, incarnation=row.worker_incarnation)
    except Exception:  # registry unreachable: assume the other node is gone, like recovery does
        return False


def _outlived(row: Any, now: datetime) -> bool:
    """Running past the model's time limit plus a margin (recovery re-sends such subtasks)."""
    limit = get_catalog().time_limit(row.model)
    return row.started_at is not None and row.started_at < now - timedelta(seconds=limit + RUNNING_MARGIN)


def outcome_record(*, node: str, outcome: dict[str, Any]) -> dict[str, Any]:
    """The audit record of a subtask's outcome: `subtask.finished|failed|stopped|skipped`."""
    if outcome.get("skipped"):
        action = "subtask.skipped"
    elif outcome.get("stopped"):
        action = "subtask.stopped"
    else:
        action = "subtask.finished" if outcome.get("ok") else "subtask.failed"
    # A credentialed node's part: its node, attempt and signature are kept with the record.
    data = {k: outcome.get(k) for k in ("index", "items", "seconds", "ok", "error", "duplicate", "key", "sha256",
                                        "node_id", "attempt", "signature")
            if outcome.get(k) is not None}
    return pending_values(actor=f"worker:{node}", action=action, subject=f"subtask:{outcome.get('subtask_id')}",
                          data=data)


def _outcome_params(work: Work, *, node: str, outcome: dict[str, Any], kind: str, seconds: float,
                    now: datetime, held: bool = False) -> dict[str, Any]:
    """`held`: only the run `node` claimed, at the work's attempt, may move (a credentialed node's)."""
    amount, detail = charges.amount_for(model=work.model, device=work.device, seconds=seconds, items=work.items,
                                        outcome=kind)
    if work.platform_paid:  # a spot check or a tie-break: the platform's cost, not the owner's
        amount = None
    return {"id": uuid.UUID(work.subtask_id), "seconds": seconds, "topic": topic_for("SubTaskCompleted"),
            "held_by": node if held else None, "held_attempt": work.attempts if held else None,
            **charges.params(user_id=work.user_id, task_id=work.task_id, subtask_id=work.subtask_id,
                             amount=amount, ok=kind == "done", detail=detail, now=now),
            **record_params("o", outcome_record(node=node, outcome=outcome))}


@dataclass
class Recorded:
    """What an outcome's statement found: whether it moved the row, and what follows."""

    moved: bool
    last: bool = False  # no other subtask of the task is open: the task can be finished
    subtasks: int = 0
    queue: str = ""
    late_charge: bool = False  # charged after its task was settled: settle it (`billing.settle_late`)
    task_id: str = ""  # where the statement returned it (`drop_check`)


def complete(work: Work, *, node: str, key: str, sha256: str, seconds: float, held: bool = False,
             signed: dict[str, Any] | None = None) -> Recorded:
    """Running -> Done, with its SubTaskCompleted event, charge and audit records, in one statement.

    `held`: only the run `node` holds at `work.attempts` completes; `signed`: the node's id, attempt
    and signature, kept in the outcome's audit record."""
    now = utcnow()
    outcome = work.outcome(ok=True, key=key, sha256=sha256, seconds=seconds, **(signed or {}))
    params = {**_outcome_params(work, node=node, outcome=outcome, kind="done", seconds=seconds, now=now, held=held),
              "key": key, "sha": sha256}
    with autocommit() as conn:
        row = sql.COMPLETE.execute(conn, params).first()
        if row is None:
            return Recorded(moved=False)
        return Recorded(moved=True, last=was_last(conn, row), subtasks=int(row.subtask_count), queue=row.queue,
                        late_charge=bool(row.inserted) and row.hold_status == "released")


def was_last(conn: Any, row: Any) -> bool:
    """Whether the completion `row` (COMPLETE's, committed) left its task no open subtask.

    Its statement saw the others as of its start: subtasks finishing at once may each see the
    others still Running, and none would be the last. One that saw only Running siblings looks
    again, after its commit: the last of them to commit sees none open. Several may answer yes;
    finalize takes the task's lock and the others find it final. One that saw a Pending sibling
    (waiting in the database or the broker) is not the last: that sibling completes after it. A
    Pending spot check may be dropped instead (`drop_check` looks again too): it counts as Running.
    """
    if row.open_left is None:
        return True
    if row.open_left == "pending":
        return False
    return not sql.OPEN_LEFT.execute(conn, {"task_id": row.task_id}).scalar()


def retry(subtask_id: str, *, error: str, held_by: str | None = None) -> bool:
    """Running -> Pending before a retry, keeping the last error visible; its message is re-sent.
    `held_by`: only while that node holds the run. Whether the row moved."""
    with autocommit() as conn:
        return conn.execute(sql.RETRY, {"id": uuid.UUID(subtask_id), "error": error,
                                        "held_by": held_by}).first() is not None


def stop(work: Work, *, node: str, seconds: float, reason: str, held: bool = False) -> Recorded:
    """Running -> Cancelled: its task ended while it ran and the run was stopped; charged for the
    time it ran (`billing.charges.amount_for`, "stopped")."""
    now = utcnow()
    outcome = work.outcome(ok=False, stopped=True, error=reason, seconds=seconds)
    params = {**_outcome_params(work, node=node, outcome=outcome, kind="stopped", seconds=seconds, now=now,
                                held=held),
              "error": reason}
    with autocommit() as conn:
        row = sql.STOP.execute(conn, params).first()
    if row is None:
        return Recorded(moved=False)
    return Recorded(moved=True, queue=row.queue, late_charge=bool(row.inserted) and row.hold_status == "released")


def fail(work: Work, *, node: str, error: str, seconds: float, held: bool = False) -> Recorded:
    """Running -> Failed for good, charged per the price card's `failed` rule, and its task Failed
    in the same transaction (`ends.fail_task`): its other subtasks are Cancelled, stopped if running."""
    now = utcnow()
    outcome = work.outcome(ok=False, error=error, seconds=seconds)
    params = {**_outcome_params(work, node=node, outcome=outcome, kind="failed", seconds=seconds, now=now,
                                held=held),
              "error": error}
    with session_scope() as session:
        # The task's row first, as every task-level door takes it before its subtasks' rows.
        task = lock_task(session, work.task_id)
        row = sql.FAIL.execute(session.connection(), params).first()
        if row is None:
            return Recorded(moved=False)
        if task is not None:
            fail_task(session, task=task, error=f"subtask {work.index} failed: {error}")
        return Recorded(moved=True, queue=row.queue,
                        late_charge=bool(row.inserted) and row.hold_status == "released")


def drop_check(subtask_id: str, *, reason: str) -> Recorded:
    """Pending -> Cancelled for a spot check (a redundancy-1 task's extra run at the platform's cost)
    that no node other than those that ran its batch can run now: the task does not wait on it.
    Nothing is charged. `last`: no other run of the task is open (the caller finishes it)."""
    with autocommit() as conn:
        row = conn.execute(sql.DROP_CHECK, {"id": uuid.UUID(subtask_id), "now": utcnow(),
                                            "reason": reason}).first()
        # As `was_last`: a completion committing beside this drop saw the check Pending, this drop
        # saw that run open; the one that looks again after its commit finds none open.
        last = row is not None and (not row.open_left
                                    or not sql.OPEN_LEFT.execute(conn, {"task_id": row.task_id}).scalar())
    if row is None:
        return Recorded(moved=False)
    return Recorded(moved=True, last=last, subtasks=int(row.subtask_count), queue=row.queue or "",
                    task_id=str(row.task_id))

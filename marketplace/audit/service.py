"""Audit log: one hash chain of signed records, appended under a Postgres advisory lock.

Two ways in, one chain:

- `append(session, ...)` (API and service actions): the record joins the caller's
  transaction and is chained in a `before_commit` hook, so the advisory lock is held
  only from just before COMMIT to COMMIT, after the caller's own writes are flushed
  (the lock holder then only inserts, so it can never deadlock with row locks).
- `enqueue(session, ...)` (high-rate subtask signals): a plain INSERT into
  `audit_pending`, no lock at all; `chain_pending` moves those rows into the chain in
  short batches (after each task ends, before reads, and beat every 30 s as a backstop).

How a record is hashed and signed is `hashing` (pure functions a verifier uses with the
public key alone); checkpoints and receipts are `checkpoints`.
"""
from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import String, cast, delete, event, func, insert, or_, select, text
from sqlalchemy.orm import Session

from marketplace.audit import anchor, signing
from marketplace.audit.hashing import (  # noqa: F401 (re-exported)
    GENESIS,
    canonical_json,
    canonical_ts,
    public_record,
    record_hash,
)
from marketplace.audit.models import AuditPending, AuditRecord
from marketplace.events import outbox
from marketplace.events.outbox import emit_many
from marketplace.infra.db import session_scope, take_buffer, transaction_buffer, utcnow
from marketplace.infra.prepared import Prepared

logger = logging.getLogger(__name__)
# pg_advisory_xact_lock key for the chain head: int.from_bytes(b"mp-audit") & 0x7fff...
CHAIN_LOCK_KEY = 0x6D702D6175646974
_INFO_KEY = "marketplace.audit.records"
_PENDING_KEY = "marketplace.audit.pending"
CHAIN_BATCH = 1000


def _uuid(value: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


@dataclass
class _Entry:
    ts: datetime
    actor: str
    action: str
    subject: str
    task_id: str | None
    data: str  # canonical JSON text


def _entry(actor: str, action: str, subject: str, data: dict[str, Any] | None, task_id: Any) -> _Entry:
    return _Entry(ts=utcnow(), actor=str(actor)[:255], action=str(action)[:64], subject=str(subject)[:255],
                  task_id=str(task_id) if task_id else None, data=canonical_json(data or {}))


def append(
    session: Session, *, actor: str, action: str, subject: str, data: dict[str, Any] | None = None,
    task_id: Any = None,
) -> None:
    """Add a record to the chain when `session` commits (nothing is written if it rolls back)."""
    transaction_buffer(session, _INFO_KEY).append(_entry(actor, action, subject, data, task_id))


def enqueue(
    session: Session, *, actor: str, action: str, subject: str, data: dict[str, Any] | None = None,
    task_id: Any = None, subtask_id: str | None = None,
) -> None:
    """Buffer a record in `audit_pending` (no lock); with `subtask_id` and no task_id, the task is looked up."""
    values = asdict(_entry(actor, action, subject, data, task_id))  # an audit_pending row's columns
    if values["task_id"] is None and subtask_id:
        from marketplace.tasks.models import SubTask

        values["task_id"] = (
            select(cast(SubTask.task_id, String)).where(SubTask.id == _uuid(subtask_id)).scalar_subquery()
        )
        session.execute(insert(AuditPending).values(**values))
    else:  # written at commit, all of the transaction's records in one INSERT
        transaction_buffer(session, _PENDING_KEY).append(values)


def record(
    *, actor: str, action: str, subject: str, data: dict[str, Any] | None = None, task_id: Any = None,
    pending: bool = False, subtask_id: str | None = None,
) -> None:
    """Write one record in its own short transaction (kept even if the caller's work rolls back)."""
    with session_scope() as session:
        if pending:
            enqueue(session, actor=actor, action=action, subject=subject, data=data, task_id=task_id,
                    subtask_id=subtask_id)
        else:
            if task_id is None and subtask_id:
                from marketplace.tasks.models import SubTask

                tid = session.scalar(select(SubTask.task_id).where(SubTask.id == _uuid(subtask_id)))
                task_id = str(tid) if tid else None
            append(session, actor=actor, action=action, subject=subject, data=data, task_id=task_id)


# Keys (`signing.private_key()` objects) seen to have signed the chain's first record.
_CHAIN_KEYS: set[int] = set()


def _signs_this_chain(session: Session) -> bool:
    """Whether this process's key is the chain's: the one that signed record 1 (an empty chain
    takes any). A node or an operator's command started without the API's
    MARKETPLACE_AUDIT_SIGNING_KEY (or, for the dev key, its JWT secret) signed records that no
    verifier could check: the chain was invalid from that record on, for good."""
    key = signing.private_key()
    if id(key) in _CHAIN_KEYS:
        return True
    root = session.execute(select(AuditRecord.hash, AuditRecord.signature).where(AuditRecord.seq == 1)).first()
    if root is None:
        return True
    if signing.verify(root.hash, root.signature, key.public_key()):
        _CHAIN_KEYS.add(id(key))
        return True
    logger.error("audit: this process's signing key did not sign the chain (record 1); its records wait in "
                 "audit_pending for a process that holds the chain's key. Give it the API's "
                 "MARKETPLACE_AUDIT_SIGNING_KEY (without one, its MARKETPLACE_JWT_SECRET).")
    return False


def _chain(session: Session, entries: Iterable[_Entry]) -> int:
    """Insert entries after the current head; the caller's transaction must commit right after.
    Returns -1, and inserts nothing, when this process's key is not the chain's."""
    session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": CHAIN_LOCK_KEY})
    if not _signs_this_chain(session):
        return -1
    head = session.execute(select(AuditRecord.seq, AuditRecord.hash).order_by(AuditRecord.seq.desc()).limit(1)).first()
    seq, prev = (head.seq, head.hash) if head else (0, GENESIS)
    entries = list(entries)
    owners = _task_owners(session, {e.task_id for e in entries if e.task_id})
    rows, events = [], []
    for e in entries:
        seq += 1
        digest = record_hash(prev_hash=prev, seq=seq, ts=e.ts, actor=e.actor, action=e.action,
                             subject=e.subject, task_id=e.task_id, data=e.data)
        row = {"seq": seq, "ts": e.ts, "actor": e.actor, "action": e.action, "subject": e.subject,
               "task_id": e.task_id, "data": e.data, "prev_hash": prev, "hash": digest,
               "signature": signing.sign(digest)}
        rows.append(row)
        # The AuditEvent names the user a task's records are about, whoever wrote them (a worker,
        # the scheduler); the Kafka message read empty for those.
        events.append((e.task_id or e.subject, {**_document(row), "user_id": owners.get(e.task_id or "")}))
        prev = digest
    if rows:  # one INSERT each for the records and their AuditEvents (a batch is up to CHAIN_BATCH)
        session.execute(insert(AuditRecord.__table__), rows)
        emit_many(session, type="AuditEvent", events=events)
        root = rows[0]["hash"] if rows[0]["seq"] == 1 else session.scalar(
            select(AuditRecord.hash).where(AuditRecord.seq == 1))
        if root:
            anchor.remember(session, root=root, seq=seq, head=prev)
    return len(rows)


def _task_owners(session: Session, task_ids: set[str]) -> dict[str, str]:
    from marketplace.tasks.models import Task

    ids = [u for u in (_uuid(t) for t in task_ids) if u is not None]
    if not ids:
        return {}
    return {str(tid): str(uid) for tid, uid in session.execute(select(Task.id, Task.user_id).where(Task.id.in_(ids)))}


# A transaction's buffered records, in one prepared statement at its commit (the executemany
# it replaced took ~0.2 ms of Python for a submit's one record). Rows keep the order given.
_PENDING_SQL = """
    INSERT INTO audit_pending (ts, actor, action, subject, task_id, data)
    SELECT CAST(r->>0 AS timestamptz), r->>1, r->>2, r->>3, r->>4, r->>5
    FROM jsonb_array_elements(:rows) WITH ORDINALITY AS e(r, ord) ORDER BY ord
"""
_INSERT_PENDING = Prepared("mp_audit_pending", _PENDING_SQL, types={"rows": "jsonb"})
# ... and with the transaction's outbox events (`outbox.take_deferred`), one round trip for both:
# a submit and a finalize each have some of each.
_INSERT_PENDING_AND_EVENTS = Prepared("mp_audit_pending_events", f"""
    WITH events AS ({outbox.INSERT_EVENTS_SQL})
    {_PENDING_SQL}
""", types={"rows": "jsonb", "events": outbox.EVENTS_TYPE})


def _pending_rows(values: Iterable[dict[str, Any]]) -> str:
    """`:rows` for `_PENDING_SQL`, from `enqueue`'s values."""
    return json.dumps([[v["ts"].isoformat(), v["actor"], v["action"], v["subject"], v["task_id"], v["data"]]
                       for v in values])


def enqueue_now(records: list[dict[str, Any]]) -> None:
    """`enqueue` each of `records` (its keyword arguments, a task_id given) in one statement that
    commits by itself: for a caller with nothing else to commit, where a session's transaction
    would be three round trips (BEGIN, INSERT, COMMIT)."""
    from marketplace.infra.db import autocommit

    if not records:
        return
    rows = _pending_rows(asdict(_entry(r["actor"], r["action"], r["subject"], r.get("data"),
                                                   r.get("task_id"))) for r in records)
    with autocommit() as conn:
        _INSERT_PENDING.execute(conn, {"rows": rows})


# First among the before_commit hooks (`insert`): the outbox's own, which writes the events
# this one leaves, runs after it.
@event.listens_for(Session, "before_commit", insert=True)
def _chain_on_commit(session: Session) -> None:
    pending = take_buffer(session, _PENDING_KEY)
    if pending:
        rows = _pending_rows(pending)
        events = outbox.take_deferred(session)
        if events:
            _INSERT_PENDING_AND_EVENTS.execute(session.connection(), {"rows": rows, "events": events})
        else:
            _INSERT_PENDING.execute(session.connection(), {"rows": rows})
    entries = take_buffer(session, _INFO_KEY)
    if entries:
        # Flush the caller's own writes first: while we hold the chain lock we only insert.
        session.flush()
        if _chain(session, entries) < 0:  # kept for a process with the chain's key to chain
            _INSERT_PENDING.execute(session.connection(), {"rows": _pending_rows(asdict(e) for e in entries)})


def chain_pending(*, batch: int = CHAIN_BATCH, max_batches: int = 1000) -> int:
    """Move buffered records into the chain in id order, one short transaction per batch."""
    with session_scope() as session:
        if session.scalar(select(AuditPending.id).limit(1)) is None:
            return 0  # the common case for readers: nothing buffered, no lock taken
    total = 0
    for _ in range(max_batches):
        with session_scope() as session:
            session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": CHAIN_LOCK_KEY})
            rows = session.execute(select(AuditPending.__table__).order_by(AuditPending.id).limit(batch)).all()
            if not rows:
                break
            if _chain(session, [_Entry(ts=r.ts, actor=r.actor, action=r.action, subject=r.subject,
                                       task_id=r.task_id, data=r.data) for r in rows]) < 0:
                break  # not this process's chain: they wait for one whose key it is
            session.execute(delete(AuditPending).where(AuditPending.id.in_([r.id for r in rows])))
            total += len(rows)
        if len(rows) < batch:
            break
    return total


def pending_count(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(AuditPending)) or 0


def _document(row: Any) -> dict[str, Any]:
    get = row.get if isinstance(row, dict) else (lambda k: getattr(row, k))
    try:
        data = json.loads(get("data"))
    except ValueError:
        data = get("data")
    return {
        "seq": get("seq"), "ts": canonical_ts(get("ts")), "actor": get("actor"), "action": get("action"),
        "subject": get("subject"), "task_id": get("task_id"), "data": data, "prev_hash": get("prev_hash"),
        "hash": get("hash"), "signature": get("signature"),
    }


def list_records(
    session: Session, *, task_id: str | None = None, about: str | None = None, after_seq: int | None = None,
    limit: int = 100,
) -> tuple[list[dict[str, Any]], int | None]:
    """A page of records in seq order: for one task, about one actor/subject, or all; returns (docs, next cursor)."""
    stmt = select(AuditRecord).order_by(AuditRecord.seq).limit(limit + 1)
    if task_id is not None:
        stmt = stmt.where(AuditRecord.task_id == task_id)
    if about is not None:
        stmt = stmt.where(or_(AuditRecord.actor == about, AuditRecord.subject == about))
    if after_seq is not None:
        stmt = stmt.where(AuditRecord.seq > after_seq)
    rows = list(session.scalars(stmt))
    more = len(rows) > limit
    rows = rows[:limit]
    return [_document(r) for r in rows], (rows[-1].seq if more and rows else None)


def chain_page(session: Session, *, after_seq: int = 0, limit: int = 1000) -> tuple[list[dict[str, Any]], int | None]:
    """Records after `after_seq` in their public form (`hashing.public_record`: every field as hashed),
    for verifiers; returns (records, next after_seq or None at the end)."""
    rows = list(session.scalars(select(AuditRecord).where(AuditRecord.seq > after_seq)
                                .order_by(AuditRecord.seq).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return [public_record(r) for r in rows], (rows[-1].seq if more and rows else None)


def verify_chain(session: Session) -> dict[str, Any]:
    """Walk the chain in seq order; report the first record that is edited, missing, out of place or unsigned.

    `first_bad_seq` is the sequence number where the chain first breaks: an edited
    record's own seq, a deleted record's (now missing) seq, the first of two swapped.
    Removing records from the *end* leaves a valid shorter chain: the head anchored in
    Redis after each append (`anchor`) must still be there, unchanged (`anchored_seq`
    says which record was checked; None when Redis keeps no anchor for this chain).
    """
    key = signing.public_key()
    expected, prev, length, head = 1, GENESIS, 0, GENESIS
    # The anchor first, the walk after: the walk's snapshot then holds every record the anchor
    # names (an append committing in between would otherwise look like a truncation).
    root = session.scalar(select(AuditRecord.hash).where(AuditRecord.seq == 1))
    anchored, anchored_hash_here = (_anchored(root) if root else None), None

    def bad(seq: int, reason: str) -> dict[str, Any]:
        return {"valid": False, "length": length, "head": head, "first_bad_seq": seq, "reason": reason,
                "anchored_seq": anchored[0] if anchored else None}

    stmt = select(AuditRecord).order_by(AuditRecord.seq).execution_options(yield_per=2000)
    for r in session.scalars(stmt):
        if r.seq != expected:
            if r.seq > expected:
                return bad(expected, f"record {expected} is missing (next is {r.seq}): deleted")
            return bad(r.seq, f"unexpected seq {r.seq} after {expected - 1}")
        digest = record_hash(prev_hash=r.prev_hash, seq=r.seq, ts=r.ts, actor=r.actor, action=r.action,
                             subject=r.subject, task_id=r.task_id, data=r.data)
        if digest != r.hash:
            return bad(r.seq, "hash mismatch: the record was edited or moved")
        if r.prev_hash != prev:
            return bad(r.seq, "prev_hash does not match the previous record's hash: a record was removed or reordered")
        if not signing.verify(r.hash, r.signature, key):
            if r.seq == 1:  # the first record sets the chain's key: this verifier holds another one
                return bad(1, "bad signature: this process's key did not sign the chain; is its "
                              "MARKETPLACE_AUDIT_SIGNING_KEY (or, without one, MARKETPLACE_JWT_SECRET) the API's?")
            return bad(r.seq, "bad signature")
        if anchored and r.seq == anchored[0]:
            anchored_hash_here = r.hash
        prev = head = r.hash
        length += 1
        expected += 1
    if anchored and length < anchored[0]:
        return bad(length + 1, f"records {length + 1} to {anchored[0]} are missing from the end of the chain "
                               f"(its head was anchored at seq {anchored[0]}): truncated")
    if anchored and anchored_hash_here != anchored[1]:
        return bad(anchored[0], f"record {anchored[0]} differs from the anchored head: the chain was rewritten")
    return {"valid": True, "length": length, "head": head, "first_bad_seq": None, "reason": None,
            "anchored_seq": anchored[0] if anchored else None}


def _anchored(root: str) -> tuple[int, str] | None:
    try:
        return anchor.read(root)
    except Exception as exc:  # Redis down: the chain itself is still checked
        logger.warning("audit: chain anchor unavailable, truncation at the end not checked: %s", exc)
        return None


def subtask_record(**kwargs: Any) -> None:
    """A per-subtask record (Celery signal handlers) buffered in its own short transaction."""
    with session_scope() as session:
        enqueue(session, **kwargs)


# -- records carried into the subtask's own first transaction ------------------------------
# `subtask.started` comes from task_prerun, moments before the subtask's claim transaction
# in the same thread. Writing it there instead of in a transaction of its own saves a
# commit per subtask (measured: ~1 ms of ~5). Pool processes run one task at a time.
_carried = threading.local()


def carry_subtask_record(*, actor: str, action: str, subject: str, data: dict[str, Any] | None = None) -> None:
    """Buffer a per-subtask record until `write_carried` runs in the subtask's transaction."""
    _carried.__dict__.setdefault("rows", []).append(pending_values(actor=actor, action=action, subject=subject,
                                                                   data=data))


def pending_values(*, actor: str, action: str, subject: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """An `audit_pending` row's {ts, actor, action, subject, data} (no task_id), for callers writing Core SQL."""
    e = _entry(actor, action, subject, data, None)
    return {"ts": e.ts, "actor": e.actor, "action": e.action, "subject": e.subject, "data": e.data}


# -- fragments for statements that write records beside their own rows (the lifecycle) ------
PENDING_COLUMNS = "ts, actor, action, subject, task_id, data"


def pending_cte(name: str, selects: list[str]) -> str:
    """A CTE `name` buffering records in `audit_pending`; each of `selects` is a SELECT of
    PENDING_COLUMNS, e.g. over a CTE of the same statement. Chained within seconds."""
    return f"""{name} AS (
        INSERT INTO audit_pending ({PENDING_COLUMNS})
        {" UNION ALL ".join(selects)}
        RETURNING id
    )"""


def record_params(prefix: str, record: dict[str, Any] | None) -> dict[str, Any]:
    """Bind parameters `<prefix>ts`, `<prefix>actor`, ... of one record (`pending_values`), all
    NULL without one: a statement's SELECT for it then adds no row (`WHERE <prefix>action IS NOT NULL`)."""
    record = record or {}
    return {f"{prefix}{k}": record.get(k) for k in ("ts", "actor", "action", "subject", "data")}


def record_select(prefix: str, *, task_id: str, source: str | None = None) -> str:
    """The SELECT of one record bound by `record_params(prefix, ...)`, if bound, once per row of
    `source` when given (the record then exists only where that row does)."""
    return (f"SELECT CAST(:{prefix}ts AS timestamptz), :{prefix}actor, :{prefix}action, :{prefix}subject, "
            f"{task_id}, :{prefix}data {'FROM ' + source if source else ''} "
            f"WHERE CAST(:{prefix}action AS text) IS NOT NULL")


RECORD_TYPES = {"ts": "timestamptz", "actor": "text", "action": "text", "subject": "text", "data": "text"}


def record_types(prefix: str) -> dict[str, str]:
    """`Prepared` types of `record_params(prefix, ...)`."""
    return {f"{prefix}{k}": v for k, v in RECORD_TYPES.items()}


def take_carried() -> list[dict[str, Any]]:
    """This thread's carried records, removed from the buffer (the caller writes them)."""
    return _carried.__dict__.pop("rows", None) or []


def write_carried(connection: Any, *, task_id: Any, rows: list[dict[str, Any]] | None = None) -> int:
    """Insert carried records (by default this thread's) through `connection` (the caller's transaction)."""
    rows = take_carried() if rows is None else rows
    if not rows:
        return 0
    connection.execute(insert(AuditPending), [{**row, "task_id": str(task_id) if task_id else None} for row in rows])
    return len(rows)

"""Signed checkpoints of the audit chain, published outside the database, and task receipts.

A checkpoint (`hashing`: {log, size, head, root, time, signature}) is written by beat
(`marketplace.audit.checkpoint`, every few seconds, acting when due): once
MARKETPLACE_AUDIT_CHECKPOINT_EVERY records were chained since the last one, or
MARKETPLACE_AUDIT_CHECKPOINT_INTERVAL seconds passed with any new record. Before signing, the
records it adds are checked with the public key (hash, link, signature): a checkpoint never
vouches for a chain already broken. It is written to the object store under
`audit/checkpoints/<size, 20 digits>.json` (before the commit; a store that fails leaves it for
the next run), kept in `audit_checkpoints` (its Merkle frontier lets the next one read only the
records after it) and published as an `AuditCheckpoint` on the `marketplace.audit` topic.

A receipt (`verifier.receipt_problem` checks one) is a finished task's completion record with an
RFC 9162 inclusion proof against the first checkpoint covering it. None covering it yet: the
caller is told when the next is due (`ReceiptPending`); checkpoints are not made on demand, so
no user can make the log sign at will.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, text
from sqlalchemy.orm import Session

from marketplace.audit import merkle, signing
from marketplace.audit.hashing import LOG_ID, canonical_ts, checkpoint_bytes, checkpoint_message, public_record
from marketplace.audit.models import AuditCheckpoint, AuditRecord, AuditTreeNode
from marketplace.audit.verifier import COMPLETIONS, RECEIPT_VERSION, ChainVerifier, receipt_bytes
from marketplace.events.outbox import emit
from marketplace.infra.db import session_scope, utcnow
from marketplace.infra.errors import Unavailable
from marketplace.settings import get_settings

logger = logging.getLogger(__name__)
PREFIX = "audit/checkpoints/"
RECEIPTS = "audit/receipts/"
# pg_advisory_xact_lock key: one checkpoint writer at a time ("mp-audit" + 1, the chain's is "mp-audit").
LOCK_KEY = 0x6D702D6175646975
MAX_RECORDS = 100_000  # added by one checkpoint: a first run over a long chain catches up in steps
BEAT_PERIOD = 5.0  # seconds between beat's looks (celeryconfig)


def store_key(size: int) -> str:
    return f"{PREFIX}{size:020d}.json"


def document(row: AuditCheckpoint) -> dict[str, Any]:
    """The checkpoint as published."""
    return {"log": LOG_ID, "size": int(row.size), "head": row.head, "root": row.root, "time": canonical_ts(row.ts),
            "signature": row.signature}


def latest(session: Session) -> AuditCheckpoint | None:
    return session.scalar(select(AuditCheckpoint).order_by(AuditCheckpoint.size.desc()).limit(1))


def list_checkpoints(session: Session, *, after_size: int = 0, limit: int = 100) -> tuple[list[dict[str, Any]], int | None]:
    """A page of checkpoints in size order; returns (docs, next cursor)."""
    rows = list(session.scalars(select(AuditCheckpoint).where(AuditCheckpoint.size > after_size)
                                .order_by(AuditCheckpoint.size).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return [document(r) for r in rows], (int(rows[-1].size) if more and rows else None)


class ChainBroken(RuntimeError):
    """The records a checkpoint would cover do not verify: nothing is signed."""


def _due(last: AuditCheckpoint | None, head: int, first_ts: datetime | None, now: datetime) -> bool:
    settings = get_settings()
    done = int(last.size) if last else 0
    if head <= done:
        return False
    if head - done >= settings.audit_checkpoint_every:
        return True
    since = last.ts if last else first_ts
    return since is None or (now - since).total_seconds() >= settings.audit_checkpoint_interval


def write_checkpoint(*, force: bool = False, store: Any = None) -> dict[str, Any] | None:
    """Sign, store and publish a checkpoint of the chain as it is, when due (or `force`);
    returns it, or None when none was due."""
    from marketplace.infra.storage import get_store

    with session_scope() as session:
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": LOCK_KEY})
        last = latest(session)
        head = session.scalar(select(func.max(AuditRecord.seq))) or 0
        first_ts = None if last else session.scalar(select(AuditRecord.ts).where(AuditRecord.seq == 1))
        now = utcnow()
        if not (force and head > (last.size if last else 0)) and not _due(last, head, first_ts, now):
            return None
        done = int(last.size) if last else 0
        size = min(head, done + MAX_RECORDS)
        checker = ChainVerifier(signing.public_key())
        if last is not None:  # continue the chain and the tree from the last checkpoint
            checker.resume(size=done, head=last.head, peaks=[bytes.fromhex(h) for h in json.loads(last.frontier)])
        nodes: list[dict[str, Any]] = []
        checker.frontier.on_node = lambda level, index, root: nodes.append(
            {"level": level, "index": index, "hash": root.hex()})
        rows = session.execute(select(AuditRecord).where(AuditRecord.seq > done, AuditRecord.seq <= size)
                               .order_by(AuditRecord.seq).execution_options(yield_per=2000)).scalars()
        for row in rows:
            if not checker.feed(public_record(row)):
                break
        verdict = checker.finish()
        if not verdict.valid or verdict.length != size:
            hint = ""
            if verdict.first_bad_seq == done + 1 and verdict.reason and "signature" in verdict.reason:
                hint = ("; is this process's MARKETPLACE_AUDIT_SIGNING_KEY (without one, its MARKETPLACE_JWT_SECRET) "
                        "the API's?")
            raise ChainBroken(f"not signing a checkpoint of {size}: record {verdict.first_bad_seq or verdict.length + 1} "
                              f"does not verify ({verdict.reason or 'missing'}){hint}")
        cp = {"log": LOG_ID, "size": size, "head": verdict.head, "root": verdict.root, "time": canonical_ts(now)}
        cp["signature"] = signing.private_key().sign(checkpoint_message(cp)).hex()
        session.execute(insert(AuditCheckpoint).values(
            size=size, head=cp["head"], root=cp["root"], ts=now, signature=cp["signature"],
            frontier=json.dumps([h.hex() for h in checker.frontier.peaks()])))
        if nodes:
            session.execute(insert(AuditTreeNode), nodes)
        emit(session, type="AuditCheckpoint", key=LOG_ID, payload=cp)
        (store or get_store()).put_bytes(store_key(size), checkpoint_bytes(cp), "application/json")
    logger.info("audit: checkpoint of %s records signed and published (root %s)", size, cp["root"])
    return cp


# -- receipts -----------------------------------------------------------------------------------

@dataclass
class ReceiptPending:
    """No published checkpoint covers the record yet (or it is not chained yet)."""

    seq: int | None
    retry_after: int
    detail: str


def task_receipt(session: Session, *, task_id: str, user: Any) -> bytes | ReceiptPending:
    """`receipt` for the task's owner (anyone else: not found, admins included: a receipt is the
    owner's); Conflict until the task has finished."""
    from marketplace.infra.errors import Conflict, NotFound
    from marketplace.tasks import service as tasks
    from marketplace.tasks.models import TaskStatus

    task = tasks.get_task(session, task_id=task_id, user=user)
    if task.user_id != user.id:
        raise NotFound(f"task {task_id} not found")
    if not TaskStatus(task.status).final:
        raise Conflict(f"task {task.id} is {task.status}; a receipt exists once it has finished",
                       task_status=task.status)
    return receipt(session, task_id=str(task.id))


def _completion_record(session: Session, task_id: str) -> AuditRecord | None:
    return session.scalar(select(AuditRecord).where(AuditRecord.task_id == task_id,
                                                    AuditRecord.action.in_(COMPLETIONS))
                          .order_by(AuditRecord.seq).limit(1))


def receipt(session: Session, *, task_id: str, store: Any = None) -> bytes | ReceiptPending:
    """The receipt of a finished task (its bytes, canonical), or when to ask again."""
    from marketplace.audit import service
    from marketplace.infra.storage import ObjectNotFound, get_store

    store = store or get_store()
    key = f"{RECEIPTS}{task_id}.json"
    try:
        return store.get_bytes(key)  # a receipt never changes once made: the first checkpoint covering it
    except ObjectNotFound:
        pass
    record = _completion_record(session, task_id)
    if record is None:
        service.chain_pending()
        record = _completion_record(session, task_id)
    if record is None:
        return ReceiptPending(None, 2, "the task's completion record is not in the chain yet")
    cp = session.scalar(select(AuditCheckpoint).where(AuditCheckpoint.size >= record.seq)
                        .order_by(AuditCheckpoint.size).limit(1))
    if cp is None:
        return ReceiptPending(record.seq, _seconds_to_next(session), f"record {record.seq} is in the chain; no "
                              "published checkpoint covers it yet")
    path = merkle.inclusion_proof_by_ranges(record.seq - 1, int(cp.size), _subtree_roots(session))
    if not merkle.verify_inclusion(merkle.leaf_hash(bytes.fromhex(record.hash)), record.seq - 1, int(cp.size), path,
                                   bytes.fromhex(cp.root)):
        # The records (or the kept subtrees) differ from what was signed: a receipt would not verify.
        logger.error("audit: the chain's first %s records no longer match their checkpoint", cp.size)
        raise Unavailable("the audit log no longer matches its signed checkpoint; no receipt can be given")
    doc = {
        "version": RECEIPT_VERSION, "task_id": task_id, "record": public_record(record),
        "proof": {"leaf_index": record.seq - 1, "tree_size": int(cp.size), "hashes": [h.hex() for h in path]},
        "checkpoint": document(cp),
    }
    raw = receipt_bytes(doc)
    store.put_bytes(key, raw, "application/json")
    return raw


def _subtree_roots(session: Session) -> Callable[[int, int], bytes]:
    """MTH of leaves lo..hi-1 (records lo+1..hi) from the kept subtree roots (`audit_tree_nodes`),
    reading records only below 2**NODE_STEP leaves: a proof reads a few thousand rows, not the log."""
    step = merkle.NODE_STEP

    def leaves(lo: int, hi: int) -> bytes:
        hashes = session.scalars(select(AuditRecord.hash).where(AuditRecord.seq > lo, AuditRecord.seq <= hi)
                                 .order_by(AuditRecord.seq)).all()
        if len(hashes) != hi - lo:
            raise Unavailable(f"audit records {lo + 1}..{hi} are not all there; no receipt can be given")
        return merkle.root_of_leaf_hashes([merkle.leaf_hash(bytes.fromhex(h)) for h in hashes])

    def mth(lo: int, hi: int) -> bytes:
        n = hi - lo
        if n & (n - 1) or lo % n:  # not a perfect, aligned subtree: split as RFC 9162 does
            k = 1 << ((n - 1).bit_length() - 1)
            return merkle.node_hash(mth(lo, lo + k), mth(lo + k, hi))
        level = n.bit_length() - 1
        kept = level - level % step  # the highest kept level at or below it
        if kept == 0:
            return leaves(lo, hi)
        rows = dict(session.execute(select(AuditTreeNode.index, AuditTreeNode.hash).where(
            AuditTreeNode.level == kept, AuditTreeNode.index >= lo >> kept,
            AuditTreeNode.index < hi >> kept)).all())
        if len(rows) != n >> kept:  # not kept (a checkpoint older than the nodes): from the leaves
            return leaves(lo, hi)
        return merkle.root_of_leaf_hashes([bytes.fromhex(rows[i]) for i in sorted(rows)])

    return mth


def _seconds_to_next(session: Session) -> int:
    last = latest(session)
    interval = get_settings().audit_checkpoint_interval
    wait = interval if last is None else interval - (utcnow() - last.ts).total_seconds()
    return max(1, math.ceil(max(wait, 0) + BEAT_PERIOD))

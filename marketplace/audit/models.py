"""Append-only, hash-chained, signed audit records, and the buffer that feeds them."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Index, SmallInteger, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from marketplace.infra.db import Base


class AuditRecord(Base):
    __tablename__ = "audit_records"
    __table_args__ = (Index("ix_audit_subject", "subject"), Index("ix_audit_task", "task_id"))

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    ts: Mapped[datetime] = mapped_column()
    actor: Mapped[str] = mapped_column(String(255))
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(255))
    task_id: Mapped[str | None] = mapped_column(String(64))
    data: Mapped[str] = mapped_column(Text)  # canonical JSON, exactly as hashed
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    signature: Mapped[str] = mapped_column(String(128))


class AuditPending(Base):
    """Subtask-level events, written without any lock and chained in batches later.

    High-rate signal handlers (a subtask started, finished, was charged) insert here so
    they never queue behind the chain's advisory lock; `service.chain_pending` moves the
    rows into `audit_records` in id order.
    """

    __tablename__ = "audit_pending"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    ts: Mapped[datetime] = mapped_column()
    actor: Mapped[str] = mapped_column(String(255))
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(255))
    task_id: Mapped[str | None] = mapped_column(String(64))
    data: Mapped[str] = mapped_column(Text)


class AuditCheckpoint(Base):
    """A signed tree head: the chain's first `size` records, their head and RFC 9162 Merkle root.

    Published to the object store and the `marketplace.audit` topic; kept here so the next one
    continues from `frontier` (the roots of the perfect subtrees, JSON hex list) and receipts
    find the first checkpoint covering a record.
    """

    __tablename__ = "audit_checkpoints"

    size: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    head: Mapped[str] = mapped_column(String(64))
    root: Mapped[str] = mapped_column(String(64))
    ts: Mapped[datetime] = mapped_column()
    signature: Mapped[str] = mapped_column(String(128))
    frontier: Mapped[str] = mapped_column(Text)


class AuditTreeNode(Base):
    """The root of a perfect subtree of the checkpoints' Merkle tree: leaves (records)
    index * 2**level + 1 .. (index + 1) * 2**level, for levels 8, 16, 24, ... (`merkle.NODE_STEP`).
    Written with the checkpoint that completed it; receipts' proofs read these instead of every record."""

    __tablename__ = "audit_tree_nodes"

    level: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    index: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    hash: Mapped[str] = mapped_column(String(64))

"""Ledger and holds. Money is Numeric, never float."""
from __future__ import annotations

import uuid
from datetime import date, datetime
from decimal import Decimal

from sqlalchemy import BigInteger, Date, ForeignKey, Index, String, UniqueConstraint, Uuid, text
from sqlalchemy.orm import Mapped, mapped_column

from marketplace.infra.db import Base, utcnow


class LedgerEntry(Base):
    __tablename__ = "ledger_entries"
    __table_args__ = (
        # A redelivered or retried subtask can never be charged twice.
        UniqueConstraint("subtask_id", "kind", name="uq_ledger_subtask_kind"),
        Index("ix_ledger_user_id", "user_id", "id"),
        Index("ix_ledger_task", "task_id"),
        Index("ix_ledger_user_created", "user_id", "created_at"),  # today's spend (migration 0002)
        Index("ix_ledger_unsettled", "task_id", postgresql_where=text("NOT settled")),  # recovery (0005)
        Index("ix_ledger_node_earnings", "user_id", "node_id", postgresql_where=text("kind = 'earning'")),  # 0011
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    task_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    subtask_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    kind: Mapped[str] = mapped_column(String(32))  # signup | topup | charge | charge_failed | adjustment | earning
    amount: Mapped[Decimal] = mapped_column()  # negative for charges
    detail: Mapped[str | None] = mapped_column(String(255))
    settled: Mapped[bool] = mapped_column(default=False)
    # An earning's node (migration 0011): the provider's earnings per node.
    node_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# A hold's status: reserved for a task not settled yet, then released by its settlement. Written
# into SQL text too (billing.service's prepared statements, the partial index below).
HOLD_ACTIVE = "active"
HOLD_RELEASED = "released"


class Hold(Base):
    __tablename__ = "holds"
    # The held amount at every submit reads only the user's open holds (migration 0003).
    __table_args__ = (Index("ix_holds_user_active", "user_id", postgresql_where=text(f"status = '{HOLD_ACTIVE}'")),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    task_id: Mapped[uuid.UUID] = mapped_column(Uuid, unique=True)
    amount: Mapped[Decimal] = mapped_column()
    status: Mapped[str] = mapped_column(String(16), default=HOLD_ACTIVE)  # HOLD_ACTIVE | HOLD_RELEASED
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    released_at: Mapped[datetime | None] = mapped_column()


class DailySpend(Base):
    """Settled charges per user and UTC day of the charge (migration 0004).

    The daily spend quota reads one row at every submit; summing the day's ledger
    rows grew with the user's traffic (a thousand-subtask job is a thousand rows).
    Settlement adds the charges it settles, by the day each charge was recorded.
    """

    __tablename__ = "daily_spend"

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    charged: Mapped[Decimal] = mapped_column()  # positive: credits spent

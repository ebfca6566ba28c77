"""Users, with their balance and quota overrides."""
from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal

from sqlalchemy import SmallInteger, String, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from marketplace.infra.db import Base, new_id, utcnow


class User(Base):
    __tablename__ = "users"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=new_id)
    email: Mapped[str] = mapped_column(String(320), unique=True, index=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16), default="user")  # user | admin | auditor
    webhook_secret: Mapped[str] = mapped_column(String(128))
    # Settled balance; running tasks' charges are applied at settlement.
    balance: Mapped[Decimal] = mapped_column(default=Decimal("0"))
    # Quota overrides; NULL means the settings default.
    max_active_tasks: Mapped[int | None] = mapped_column(default=None)
    max_items_per_task: Mapped[int | None] = mapped_column(default=None)
    daily_spend_limit: Mapped[Decimal | None] = mapped_column(default=None)
    # The fair dispatcher's weight for this user, and a cap on its subtasks in flight (NULL: the setting's).
    share: Mapped[float] = mapped_column(default=1.0)
    max_running_subtasks: Mapped[int | None] = mapped_column(default=None)
    # The least redundancy this user's tasks run with (NULL: MARKETPLACE_MIN_REDUNDANCY).
    min_redundancy: Mapped[int | None] = mapped_column(SmallInteger, default=None)
    # Sells compute: may enroll nodes (`marketplace users set EMAIL --provider`); any role may be one.
    provider: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def is_auditor(self) -> bool:
        """The `auditor` role reads the whole audit log (records, checkpoints) and nothing else."""
        return self.role == "auditor"

    @property
    def reads_audit_log(self) -> bool:
        return self.role in ("admin", "auditor")

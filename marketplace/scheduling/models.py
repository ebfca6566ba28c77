"""What the fair dispatcher remembers per queue and user (scheduling/fair.py)."""
from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, Integer, String, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from marketplace.infra.db import Base, utcnow


class FairShare(Base):
    """A user's use of a queue's slots: the slot-seconds its subtasks took (`used`, raised when the
    user comes back after an idle spell so that idling banks no credit), and the mean seconds of
    its recent subtasks there (what a released subtask is expected to take)."""

    __tablename__ = "fair_shares"

    queue: Mapped[str] = mapped_column(String(128), primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    used: Mapped[float] = mapped_column(default=0.0)
    done: Mapped[int] = mapped_column(Integer, default=0)
    avg_seconds: Mapped[float | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

"""Durable record of compute nodes; liveness itself is a heartbeat key in Redis."""
from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from marketplace.infra.db import Base, utcnow


class Worker(Base):
    __tablename__ = "workers"

    hostname: Mapped[str] = mapped_column(String(255), primary_key=True)
    queues: Mapped[list[Any]] = mapped_column(default=list)
    models: Mapped[list[Any]] = mapped_column(default=list)
    facts: Mapped[dict[str, Any]] = mapped_column(default=dict)  # cpu, memory, gpu
    concurrency: Mapped[int] = mapped_column(Integer, default=1)
    status: Mapped[str] = mapped_column(String(16), default="online")  # online | offline
    registered_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_heartbeat: Mapped[datetime] = mapped_column(default=utcnow)
    deregistered_at: Mapped[datetime | None] = mapped_column()


class NodeReputation(Base):
    """A node's record of replicas judged against their quorum (`registry.reputation`)."""

    __tablename__ = "node_reputation"

    worker: Mapped[str] = mapped_column(String(255), primary_key=True)  # the node's hostname, as in subtasks.worker
    agreed: Mapped[int] = mapped_column(Integer, default=0)
    disagreed: Mapped[int] = mapped_column(Integer, default=0)
    demoted: Mapped[bool] = mapped_column(default=False)  # no solo work (redundancy 1) until its score recovers
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

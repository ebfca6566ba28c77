"""Nodes that providers enroll: each holds an Ed25519 public key and the hash of its secret."""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, String, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from marketplace.infra.db import Base, new_id, utcnow


class Node(Base):
    __tablename__ = "nodes"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=new_id)
    provider_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    # Unique on the platform: the node's hostname in the registry and on its claims is `<name>@node`.
    name: Mapped[str] = mapped_column(String(63), unique=True)
    hostname: Mapped[str] = mapped_column(String(255), unique=True)
    queues: Mapped[list[Any]] = mapped_column(default=list)
    public_key: Mapped[str] = mapped_column(String(64))  # base64 of the raw 32-byte Ed25519 key
    secret_hash: Mapped[str] = mapped_column(String(64))  # sha256 hex of the node secret
    enabled: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    rotated_at: Mapped[datetime | None] = mapped_column()
    disabled_at: Mapped[datetime | None] = mapped_column()

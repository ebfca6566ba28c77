"""Tasks and their subtasks: the database is the source of truth."""
from __future__ import annotations

import enum
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import ForeignKey, Index, Integer, SmallInteger, String, Text, UniqueConstraint, Uuid, text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from marketplace.infra.db import Base, new_id, utcnow


class TaskStatus(str, enum.Enum):
    CREATED = "Created"
    SCHEDULED = "Scheduled"
    IN_PROGRESS = "InProgress"
    DONE = "Done"
    FAILED = "Failed"
    CANCELLED = "Cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL_TASK_STATUSES


FINAL_TASK_STATUSES = frozenset({TaskStatus.DONE, TaskStatus.FAILED, TaskStatus.CANCELLED})
ACTIVE_TASK_STATUSES = frozenset({TaskStatus.CREATED, TaskStatus.SCHEDULED, TaskStatus.IN_PROGRESS})


class SubTaskStatus(str, enum.Enum):
    PENDING = "Pending"
    RUNNING = "Running"
    DONE = "Done"
    FAILED = "Failed"
    CANCELLED = "Cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL_SUBTASK_STATUSES


FINAL_SUBTASK_STATUSES = frozenset({SubTaskStatus.DONE, SubTaskStatus.FAILED, SubTaskStatus.CANCELLED})


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        UniqueConstraint("user_id", "idempotency_key", name="uq_tasks_user_idempotency"),
        Index("ix_tasks_user_created", "user_id", "created_at"),
        Index("ix_tasks_status", "status"),
        Index("ix_tasks_user_status", "user_id", "status"),  # the active-task quota, at every submit
        Index("ix_tasks_webhook_in_flight", "webhook_sent_at",
              postgresql_where=text("webhook_sent_at IS NOT NULL AND webhook_done_at IS NULL")),
        # The fair dispatcher's two reads per release (scheduling/fair.py): the tasks of a queue
        # with subtasks not yet released, and the active tasks of a queue.
        Index("ix_tasks_backlog", "queue", postgresql_where=text("backlog > 0")),
        Index("ix_tasks_active_queue", "queue", postgresql_where=text("status IN ('Scheduled', 'InProgress')")),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=new_id)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(64))
    device: Mapped[str] = mapped_column(String(8))  # requested: any | cpu | gpu
    queue: Mapped[str | None] = mapped_column(String(128))  # chosen at scheduling
    status: Mapped[str] = mapped_column(String(16), default=TaskStatus.CREATED.value)
    status_reason: Mapped[str | None] = mapped_column(Text)  # why it waits, visible to the user
    error: Mapped[str | None] = mapped_column(Text)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    batch_size: Mapped[int] = mapped_column(Integer)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    total_items: Mapped[int] = mapped_column(Integer)
    subtask_count: Mapped[int] = mapped_column(Integer, default=0)  # rows: every replica of every batch
    # Verified results: each batch runs on this many distinct nodes and a quorum must agree.
    redundancy: Mapped[int] = mapped_column(SmallInteger, default=1)
    # Its replicas go to nodes of distinct providers: its queue had k live providers at its last
    # release (`scheduling.replicas.place`); a claim that finds them gone clears it (`lifecycle.work`).
    spread_providers: Mapped[bool] = mapped_column(default=False)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    max_cost: Mapped[Decimal | None] = mapped_column()
    estimated_cost: Mapped[Decimal] = mapped_column(default=Decimal("0"))
    cost: Mapped[Decimal | None] = mapped_column()  # settled cost, set at the final status
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    trace_id: Mapped[str | None] = mapped_column(String(32))
    result_key: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    scheduled_at: Mapped[datetime | None] = mapped_column()
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    # Bumped on every subtask outcome; recovery looks for tasks that stopped moving.
    progress_at: Mapped[datetime] = mapped_column(default=utcnow)
    dispatch_count: Mapped[int] = mapped_column(Integer, default=0)  # assignments and recovery re-sends
    # Subtasks that wait in the database for the fair dispatcher to release them to the broker.
    backlog: Mapped[int] = mapped_column(Integer, default=0)
    # A webhook's delivery (`marketplace.webhooks`): its latest message, and its end. Recovery
    # re-sends one whose message was lost (`maintenance.resend_lost_webhooks`).
    webhook_sent_at: Mapped[datetime | None] = mapped_column()
    webhook_done_at: Mapped[datetime | None] = mapped_column()

    subtasks: Mapped[list[SubTask]] = relationship(
        back_populates="task", order_by="SubTask.index", cascade="all, delete-orphan"
    )


class SubTask(Base):
    __tablename__ = "subtasks"
    __table_args__ = (
        # A subtask run on k nodes is k rows of one index (`replica`); deferrable: a claim may swap
        # two never-run replicas' payloads in one statement (`lifecycle.work`).
        UniqueConstraint("task_id", "index", "replica", name="uq_subtasks_task_index_replica",
                         deferrable=True, initially="IMMEDIATE"),
        # Never two replicas of a batch on one node, even when two of its processes claim at once.
        Index("uq_subtasks_replica_node", "task_id", "index", "worker", unique=True,
              postgresql_where=text("worker IS NOT NULL")),
        # Never two of a batch's first k runs on nodes of one provider where its task spreads them
        # (`tasks.spread_providers`): two nodes of one provider claiming at once each see no sibling.
        Index("uq_subtasks_replica_provider", "task_id", "index", "spread_provider", unique=True,
              postgresql_where=text("spread_provider IS NOT NULL")),
        Index("ix_subtasks_task_status", "task_id", "status"),
        # What the fair dispatcher releases next (never sent, in index order), and what is in
        # flight (sent and waiting in the broker, or running): each read is O(its rows).
        Index("ix_subtasks_unreleased", "task_id", "index",
              postgresql_where=text("status = 'Pending' AND dispatches = 0")),
        Index("ix_subtasks_in_flight", "task_id",
              postgresql_where=text("status = 'Running' OR (status = 'Pending' AND dispatches > 0)")),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=new_id)
    task_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    # 0 for the first run of a batch; 1.. for its other replicas (redundancy, spot checks, and the
    # extra runs of replicas that disagreed). `agreed`: set when its batch's quorum was decided.
    replica: Mapped[int] = mapped_column(SmallInteger, default=0)
    agreed: Mapped[bool | None] = mapped_column(default=None)
    # A spot check or a tie-break run: not charged to the task's owner.
    platform_paid: Mapped[bool] = mapped_column(default=False)
    # The claiming node's provider ('' for the operator's nodes) when its task spreads its replicas
    # over providers and this is one of its first k runs; NULL otherwise.
    spread_provider: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default=SubTaskStatus.PENDING.value)
    inputs: Mapped[list[Any]] = mapped_column()
    items: Mapped[int] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Times it was sent to the broker; its message id is `<id>:<dispatches>` (0: it waits in the database).
    dispatches: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255))
    # The claiming node process (its id in the registry's heartbeat): a node restarted under the
    # same `worker` name makes a new one, so its predecessor's Running rows are known dead.
    worker_incarnation: Mapped[str | None] = mapped_column(String(32))
    celery_id: Mapped[str | None] = mapped_column(String(64))
    result_key: Mapped[str | None] = mapped_column(Text)
    result_sha256: Mapped[str | None] = mapped_column(String(64))
    seconds: Mapped[float | None] = mapped_column()
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The latest attempt's start: recovery and a re-sent copy judge a Running subtask by it.
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()

    task: Mapped[Task] = relationship(back_populates="subtasks")

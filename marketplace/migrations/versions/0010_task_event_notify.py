"""Task event streams: a task's outbox events by key, in id order

`GET /v1/tasks/<id>/events` reads a task's events once when a stream opens (from its
`Last-Event-ID`); the live ones come from one outbox reader per API process, which needs no
trigger (`marketplace.events.feed`). Without this index that first read scanned the outbox.

Revision ID: 0010_task_event_notify
Revises: 0009_audit_checkpoints
"""
from collections.abc import Sequence

from alembic import op

revision: str = "0010_task_event_notify"
down_revision: str | Sequence[str] | None = "0009_audit_checkpoints"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_outbox_key_id", "outbox_events", ["key", "id"])


def downgrade() -> None:
    op.drop_index("ix_outbox_key_id", table_name="outbox_events")

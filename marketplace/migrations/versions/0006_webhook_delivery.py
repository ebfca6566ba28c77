"""Webhook delivery state on the task, so recovery can re-send a lost delivery

`webhook_sent_at`: when the latest delivery message was (to be) sent, written with the final
status; `webhook_done_at`: when a delivery ended (delivered, refused, or out of retries). A
final task with the first and not the second, past the stall deadline, lost its message (the
broker was down at the send, or flushed while it waited); the partial index holds only those
in flight, so the sweep never scans the task history.

Revision ID: 0006_webhook_delivery
Revises: 0005_unsettled_charges
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_webhook_delivery"
down_revision: str | Sequence[str] | None = "0005_unsettled_charges"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("tasks", sa.Column("webhook_sent_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("tasks", sa.Column("webhook_done_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_tasks_webhook_in_flight", "tasks", ["webhook_sent_at"], unique=False,
                    postgresql_where="webhook_sent_at IS NOT NULL AND webhook_done_at IS NULL")


def downgrade() -> None:
    op.drop_index("ix_tasks_webhook_in_flight", table_name="tasks")
    op.drop_column("tasks", "webhook_done_at")
    op.drop_column("tasks", "webhook_sent_at")

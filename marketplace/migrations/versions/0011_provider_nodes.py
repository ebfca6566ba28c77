"""Providers and nodes: `users.provider`, the `nodes` table, `ledger_entries.node_id` (earnings)

Revision ID: 0011_provider_nodes
Revises: 0010_task_event_notify
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0011_provider_nodes"
down_revision: str | Sequence[str] | None = "0010_task_event_notify"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("users", sa.Column("provider", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_table(
        "nodes",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("provider_id", sa.Uuid(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(63), nullable=False, unique=True),
        sa.Column("hostname", sa.String(255), nullable=False, unique=True),
        sa.Column("queues", postgresql.JSONB(), nullable=False),
        sa.Column("public_key", sa.String(64), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rotated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_nodes_provider_id", "nodes", ["provider_id"])
    op.add_column("ledger_entries", sa.Column("node_id", sa.Uuid(), nullable=True))
    op.create_index("ix_ledger_node_earnings", "ledger_entries", ["user_id", "node_id"],
                    postgresql_where="kind = 'earning'")


def downgrade() -> None:
    op.drop_index("ix_ledger_node_earnings", table_name="ledger_entries")
    op.drop_column("ledger_entries", "node_id")
    op.drop_index("ix_nodes_provider_id", table_name="nodes")
    op.drop_table("nodes")
    op.drop_column("users", "provider")

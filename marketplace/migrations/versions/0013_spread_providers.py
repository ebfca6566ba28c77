"""Verified results from distinct providers: `tasks.spread_providers`, `subtasks.spread_provider`

Set at a verified task's release when its queue has as many live providers as its redundancy:
its replicas then go to nodes of distinct providers (`lifecycle.statements.ELIGIBLE`). A claim of
one of a batch's first k runs records its node's provider, unique per batch: two nodes of one
provider claiming replicas of a batch at the same moment would each see no sibling.

Revision ID: 0013_spread_providers
Revises: 0012_verified_results
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013_spread_providers"
down_revision: str | Sequence[str] | None = "0012_verified_results"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("tasks", sa.Column("spread_providers", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column("subtasks", sa.Column("spread_provider", sa.String(64), nullable=True))
    op.create_index("uq_subtasks_replica_provider", "subtasks", ["task_id", "index", "spread_provider"], unique=True,
                    postgresql_where=sa.text("spread_provider IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("uq_subtasks_replica_provider", table_name="subtasks")
    op.drop_column("subtasks", "spread_provider")
    op.drop_column("tasks", "spread_providers")

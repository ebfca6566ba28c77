"""Verified results: `tasks.redundancy`, replica rows of a subtask, `users.min_redundancy`, node reputation

A subtask run on k nodes is k rows of `subtasks` with the same index (`replica` 0..k-1, more when
the replicas disagree, and a spot check's). The unique key becomes (task_id, index, replica),
deferrable: a claim may swap two never-run replicas' payloads (`lifecycle.work`) in one statement.

Revision ID: 0012_verified_results
Revises: 0011_provider_nodes
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012_verified_results"
down_revision: str | Sequence[str] | None = "0011_provider_nodes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("tasks", sa.Column("redundancy", sa.SmallInteger(), nullable=False, server_default="1"))
    op.add_column("users", sa.Column("min_redundancy", sa.SmallInteger(), nullable=True))
    op.add_column("subtasks", sa.Column("replica", sa.SmallInteger(), nullable=False, server_default="0"))
    op.add_column("subtasks", sa.Column("agreed", sa.Boolean(), nullable=True))
    op.add_column("subtasks", sa.Column("platform_paid", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.drop_constraint("uq_subtasks_task_index", "subtasks", type_="unique")
    op.create_unique_constraint("uq_subtasks_task_index_replica", "subtasks", ["task_id", "index", "replica"],
                                deferrable=True, initially="IMMEDIATE")
    # Never two replicas of a batch on one node: two claims at once on one node (its pool processes)
    # would each see no sibling there; this index makes the second one fail, and take another batch.
    op.create_index("uq_subtasks_replica_node", "subtasks", ["task_id", "index", "worker"], unique=True,
                    postgresql_where=sa.text("worker IS NOT NULL"))
    op.create_table(
        "node_reputation",
        sa.Column("worker", sa.String(255), primary_key=True),
        sa.Column("agreed", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("disagreed", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("demoted", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("node_reputation")
    op.drop_index("uq_subtasks_replica_node", table_name="subtasks")
    op.drop_constraint("uq_subtasks_task_index_replica", "subtasks", type_="unique")
    op.execute("DELETE FROM subtasks WHERE replica > 0")
    op.create_unique_constraint("uq_subtasks_task_index", "subtasks", ["task_id", "index"])
    op.drop_column("subtasks", "platform_paid")
    op.drop_column("subtasks", "agreed")
    op.drop_column("subtasks", "replica")
    op.drop_column("users", "min_redundancy")
    op.drop_column("tasks", "redundancy")

"""Fair dispatch: subtasks wait in the database and are released per queue in fair order

`tasks.backlog`: subtasks not yet sent to the broker; `subtasks.dispatches`: how many times a
subtask was sent (0: it waits here); `users.share` and `users.max_running_subtasks`: a user's
weight and cap; `fair_shares`: each user's use of each queue. Subtasks gain the `Cancelled`
status. Subtasks of active tasks at the upgrade were all sent already: they count as sent once.

Revision ID: 0008_fair_dispatch
Revises: 0007_worker_incarnation
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_fair_dispatch"
down_revision: str | Sequence[str] | None = "0007_worker_incarnation"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("users", sa.Column("share", sa.Float(), nullable=False, server_default="1"))
    op.add_column("users", sa.Column("max_running_subtasks", sa.Integer(), nullable=True))
    op.add_column("tasks", sa.Column("backlog", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("subtasks", sa.Column("dispatches", sa.Integer(), nullable=False, server_default="0"))
    op.execute("""
        UPDATE subtasks SET dispatches = 1 FROM tasks
        WHERE tasks.id = subtasks.task_id AND tasks.status IN ('Scheduled', 'InProgress')
          AND subtasks.status IN ('Pending', 'Running')
    """)
    op.create_index("ix_tasks_backlog", "tasks", ["queue"], postgresql_where="backlog > 0")
    op.create_index("ix_tasks_active_queue", "tasks", ["queue"],
                    postgresql_where="status IN ('Scheduled', 'InProgress')")
    op.create_index("ix_subtasks_unreleased", "subtasks", ["task_id", "index"],
                    postgresql_where="status = 'Pending' AND dispatches = 0")
    op.create_index("ix_subtasks_in_flight", "subtasks", ["task_id"],
                    postgresql_where="status = 'Running' OR (status = 'Pending' AND dispatches > 0)")
    op.create_table(
        "fair_shares",
        sa.Column("queue", sa.String(128), primary_key=True),
        sa.Column("user_id", sa.Uuid(), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("used", sa.Float(), nullable=False, server_default="0"),
        sa.Column("done", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("avg_seconds", sa.Float(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )


def downgrade() -> None:
    op.drop_table("fair_shares")
    op.drop_index("ix_subtasks_in_flight", table_name="subtasks")
    op.drop_index("ix_subtasks_unreleased", table_name="subtasks")
    op.drop_index("ix_tasks_active_queue", table_name="tasks")
    op.drop_index("ix_tasks_backlog", table_name="tasks")
    op.drop_column("subtasks", "dispatches")
    op.drop_column("tasks", "backlog")
    op.drop_column("users", "max_running_subtasks")
    op.drop_column("users", "share")

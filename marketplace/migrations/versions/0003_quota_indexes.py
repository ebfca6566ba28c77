"""Indexes for the quota sums read at every submit

`tasks(user_id, status)`: the active-task count looked at every active task of every
user through `ix_tasks_status`. `holds(user_id) WHERE status = 'active'`: the held
amount read every hold the user ever had. Both are now proportional to what the
user has open, not to the system's or the user's history.

Revision ID: 0003_quota_indexes
Revises: 0002_audit_billing
"""
from collections.abc import Sequence

from alembic import op

revision: str = "0003_quota_indexes"
down_revision: str | Sequence[str] | None = "0002_audit_billing"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_tasks_user_status", "tasks", ["user_id", "status"], unique=False)
    op.create_index("ix_holds_user_active", "holds", ["user_id"], unique=False,
                    postgresql_where="status = 'active'")


def downgrade() -> None:
    op.drop_index("ix_holds_user_active", table_name="holds")
    op.drop_index("ix_tasks_user_status", table_name="tasks")

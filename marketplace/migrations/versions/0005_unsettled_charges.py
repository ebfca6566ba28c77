"""Unsettled charges by task, for the recovery sweep that settles stray late charges

A charge that lands after its task was settled is settled right after its commit;
if that process dies first, the charge would stay unsettled (never taken from the
balance). Recovery looks for such charges; the partial index holds only unsettled
rows (the charges of running tasks), so the sweep never scans the ledger's history.

Revision ID: 0005_unsettled_charges
Revises: 0004_daily_spend
"""
from collections.abc import Sequence

from alembic import op

revision: str = "0005_unsettled_charges"
down_revision: str | Sequence[str] | None = "0004_daily_spend"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_ledger_unsettled", "ledger_entries", ["task_id"], unique=False,
                    postgresql_where="NOT settled")


def downgrade() -> None:
    op.drop_index("ix_ledger_unsettled", table_name="ledger_entries")

"""Settled charges per user and day, for the daily spend quota

Every submit summed the user's settled charges of the day from `ledger_entries`:
one row per subtask, so the check grew with the user's traffic of the day. The
`daily_spend` row is kept by settlement (which marks charges settled) and read
with one index lookup. Existing settled charges are counted in here.

Revision ID: 0004_daily_spend
Revises: 0003_quota_indexes
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_daily_spend"
down_revision: str | Sequence[str] | None = "0003_quota_indexes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "daily_spend",
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("charged", sa.Numeric(precision=24, scale=6), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("user_id", "day"),
    )
    op.execute("""
        INSERT INTO daily_spend (user_id, day, charged)
        SELECT user_id, CAST(created_at AT TIME ZONE 'UTC' AS date), -SUM(amount)
        FROM ledger_entries WHERE settled AND kind IN ('charge', 'charge_failed')
        GROUP BY 1, 2
    """)


def downgrade() -> None:
    op.drop_table("daily_spend")

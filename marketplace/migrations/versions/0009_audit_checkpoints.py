"""Audit checkpoints: signed tree heads of the audit chain (size, head, RFC 9162 Merkle root)

Each row is published to the object store (`audit/checkpoints/`) and the `marketplace.audit`
topic; `frontier` lets the next checkpoint continue the Merkle tree from this one.
`audit_tree_nodes`: roots of perfect subtrees of 256, 65,536, ... records, for receipts' proofs.

Revision ID: 0009_audit_checkpoints
Revises: 0008_fair_dispatch
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_audit_checkpoints"
down_revision: str | Sequence[str] | None = "0008_fair_dispatch"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_checkpoints",
        sa.Column("size", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("head", sa.String(64), nullable=False),
        sa.Column("root", sa.String(64), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("signature", sa.String(128), nullable=False),
        sa.Column("frontier", sa.Text(), nullable=False),
    )
    op.create_table(
        "audit_tree_nodes",
        sa.Column("level", sa.SmallInteger(), primary_key=True, autoincrement=False),
        sa.Column("index", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("audit_tree_nodes")
    op.drop_table("audit_checkpoints")

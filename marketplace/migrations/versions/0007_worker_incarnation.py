"""Which process of a node claimed a subtask: `subtasks.worker_incarnation`

A node keeps its name across restarts (`standalone@vm`), so the hostname in `worker` could not
tell a Running row of the live process from one its killed predecessor left: the copy re-sent
for it was skipped as still running there, and the job waited for the time limit. Each worker
main process makes an id at start, heartbeats it with its record and writes it with every
claim; a row whose id is not the one its node heartbeats now was left by a process that is
gone. `worker` keeps the hostname alone (shown to users, in events and charges). Nullable, no
default: adding it rewrites nothing, and rows claimed before it are judged by hostname as before.

Revision ID: 0007_worker_incarnation
Revises: 0006_webhook_delivery
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_worker_incarnation"
down_revision: str | Sequence[str] | None = "0006_webhook_delivery"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("subtasks", sa.Column("worker_incarnation", sa.String(length=32), nullable=True))


def downgrade() -> None:
    op.drop_column("subtasks", "worker_incarnation")

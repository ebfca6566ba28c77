"""Import every model so the metadata is complete (Alembic, tests)."""
from marketplace.audit.models import AuditRecord
from marketplace.billing.models import Hold, LedgerEntry
from marketplace.events.models import OutboxEvent, ProcessedSubmission
from marketplace.files.models import File
from marketplace.infra.db import Base
from marketplace.providers.models import Node
from marketplace.registry.models import Worker
from marketplace.scheduling.models import FairShare
from marketplace.tasks.models import SubTask, Task
from marketplace.users.models import User

__all__ = [
    "AuditRecord", "Base", "FairShare", "File", "Hold", "LedgerEntry", "Node", "OutboxEvent",
    "ProcessedSubmission", "SubTask", "Task", "User", "Worker",
]

"""A finished subtask's charge is written by the statement that records it, not a commit later."""
from __future__ import annotations

import uuid
from decimal import Decimal

from sqlalchemy import select

from tests.support.api import register
from tests.support.progress import stored_task


def _ledger_and_audit(task_id: str) -> tuple[list, list[tuple[str, str]]]:
    from marketplace.audit.models import AuditPending
    from marketplace.billing.models import LedgerEntry
    from marketplace.infra.db import session_scope

    with session_scope() as session:
        ledger = [(e.subtask_id, e.kind, e.amount, e.created_at) for e in session.scalars(
            select(LedgerEntry).where(LedgerEntry.task_id == uuid.UUID(task_id)))]
        audit = [(r.action, r.subject) for r in session.scalars(
            select(AuditPending).where(AuditPending.task_id == task_id).order_by(AuditPending.id))]
    return ledger, audit


def test_a_finished_subtask_is_charged_in_the_commit_that_records_its_outcome(client):  # type: ignore[no-untyped-def]
    from marketplace.billing import service
    from marketplace.billing import signals as billing_signals
    from marketplace.catalog import get_catalog
    from marketplace.infra.db import session_scope
    from marketplace.tasks.models import SubTask
    from workers import runner
    from workers.tasks import run_subtask

    user = register(client)
    task_id, (sid, _other) = stored_task(user["id"], ["a", "b"])

    result = runner.execute(sid, hostname="charge@test", retries_left=True, message_id=f"{sid}:1")
    # No task_success has fired: the body alone has written the outcome, the charge and their records.
    assert result["ok"] and result["charged"], result
    ledger, audit = _ledger_and_audit(task_id)
    with session_scope() as session:
        sub = session.get(SubTask, uuid.UUID(sid))
        assert sub.status == "Done"
        finished = sub.finished_at
    price = service.price_for(get_catalog().get("echo"), "cpu")
    expected = -service.subtask_cost(price, seconds=result["seconds"], items=1, ok=True)
    assert ledger == [(uuid.UUID(sid), "charge", expected, finished)], "one charge, in the outcome's commit"
    assert expected < Decimal(0)
    assert ("subtask.finished", f"subtask:{sid}") in audit and ("billing.charge", f"subtask:{sid}") in audit

    # The signal handler then has nothing left to write; a redelivery is reported, never charged twice.
    billing_signals._on_subtask_success(sender=run_subtask, result=result)
    again = runner.execute(sid, hostname="charge@test", retries_left=True, message_id=f"{sid}:1")
    assert again["duplicate"] and not again.get("charged")
    billing_signals._on_subtask_success(sender=run_subtask, result=again)
    assert _ledger_and_audit(task_id)[0] == ledger
    assert len(_ledger_and_audit(task_id)[1]) == len(audit) + 1  # the duplicate's own outcome record

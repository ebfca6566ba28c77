"""A finished subtask's charge is written by the statement that records it, not a commit later."""
from __future__ import annotations

import uuid
from decimal import ROUND_HALF_UP, Decimal

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
    from marketplace.infra.db import session_scope
    from marketplace.tasks.models import SubTask
    from workers import runner

    user = register(client)
    task_id, (sid, _other) = stored_task(user["id"], ["a", "b"])

    result = runner.execute(sid, hostname="charge@test", retries_left=True, message_id=f"{sid}:1")
    # No task_success has fired: the body alone has written the outcome, the charge and their records.
    assert result["ok"], result
    ledger, audit = _ledger_and_audit(task_id)
    with session_scope() as session:
        sub = session.get(SubTask, uuid.UUID(sid))
        assert sub.status == "Done"
        finished, seconds = sub.finished_at, sub.seconds
    # The price card's echo/cpu (config/models.yaml): start fee 0.0001 + seconds × 0.0001 + 1 item × 0.000001,
    # to 6 decimals half up (seconds as the worker recorded them).
    cost = Decimal("0.0001") + Decimal(str(seconds)) * Decimal("0.0001") + 1 * Decimal("0.000001")
    expected = -cost.quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)
    assert seconds == result["seconds"] < 1
    assert ledger == [(uuid.UUID(sid), "charge", expected, finished)], "one charge, in the outcome's commit"
    assert Decimal("-0.000201") < expected <= Decimal("-0.000101")  # under a second: less than 0.0001 for time
    assert ("subtask.finished", f"subtask:{sid}") in audit and ("billing.charge", f"subtask:{sid}") in audit

    # A redelivery is reported, never run or charged twice.
    again = runner.execute(sid, hostname="charge@test", retries_left=True, message_id=f"{sid}:1")
    assert again["duplicate"], again
    assert _ledger_and_audit(task_id)[0] == ledger

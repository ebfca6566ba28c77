"""One subtask outcome's charge and its audit records in a single statement.

Every subtask ends here (from the task_success handler), so this is one round
trip on a plain connection: the hold read FOR SHARE (see
`service.record_subtask_charge` for why), the ledger row inserted once per
subtask and kind, and the `billing.charge*` and outcome records buffered in
`audit_pending`. Same amounts and the same rows as the ORM path, which remains
for the other audit modes and for finalize's backfill.
"""
from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from sqlalchemy import text

from marketplace.audit.service import canonical_json, pending_values
from marketplace.billing.service import q
from marketplace.db import get_engine, utcnow

_CHARGE = text("""
    WITH h AS (
        SELECT status FROM holds WHERE task_id = :task_id FOR SHARE
    ), l AS (
        INSERT INTO ledger_entries (user_id, task_id, subtask_id, kind, amount, detail, settled, created_at)
        SELECT :user_id, :task_id, :subtask_id, :kind, :amount, :detail, false, :now
        WHERE CAST(:charge AS boolean)
        ON CONFLICT ON CONSTRAINT uq_ledger_subtask_kind DO NOTHING
        RETURNING id
    ), a AS (
        INSERT INTO audit_pending (ts, actor, action, subject, task_id, data)
        SELECT :now, 'billing', :charge_action, :charge_subject, :task_key, :charge_data FROM l
        UNION ALL
        SELECT CAST(:ots AS timestamptz), :oactor, :oaction, :osubject, :task_key, :odata
        WHERE CAST(:oaction AS text) IS NOT NULL
        RETURNING id
    )
    SELECT (SELECT status FROM h) AS hold_status, EXISTS (SELECT 1 FROM l) AS inserted
""")


def charge_outcome(
    *, user_id: str, task_id: str, subtask_id: str, amount: Decimal | None, ok: bool, detail: str,
    outcome_record: dict[str, Any] | None,
) -> tuple[bool, str | None]:
    """Charge `amount` (None: nothing to charge) and write `outcome_record`; returns (inserted, hold status).

    `outcome_record` is `{actor, action, subject, data}` for the subtask's own audit record.
    """
    kind = "charge" if ok else "charge_failed"
    now = utcnow()
    signed = -q(amount) if amount is not None else Decimal("0")
    charge_data = canonical_json({"user_id": user_id, "subtask_id": subtask_id, "amount": str(signed), "detail": detail})
    outcome = pending_values(**outcome_record) if outcome_record else {}
    params = {
        "task_id": uuid.UUID(task_id), "user_id": uuid.UUID(user_id), "subtask_id": uuid.UUID(subtask_id),
        "kind": kind, "amount": signed, "detail": detail, "now": now, "charge": amount is not None,
        "charge_action": f"billing.{kind}", "charge_subject": f"subtask:{subtask_id}", "task_key": task_id,
        "charge_data": charge_data,
        "ots": outcome.get("ts"), "oactor": outcome.get("actor"), "oaction": outcome.get("action"),
        "osubject": outcome.get("subject"), "odata": outcome.get("data"),
    }
    with get_engine().begin() as conn:
        row = conn.execute(_CHARGE, params).one()
    return bool(row.inserted), row.hold_status

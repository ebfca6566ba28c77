"""One subtask outcome's charge and its audit records in a single statement.

The hold is read FOR SHARE (see `service.record_subtask_charge` for why), the
ledger row inserted once per subtask and kind, and the `billing.charge*` and
outcome records buffered in `audit_pending`. A successful subtask does all of
this in the statement that records its outcome (`complete_and_charge`): one
commit per finished subtask, and no moment where it is Done but uncharged.
Other outcomes are charged by the task_success handler (`charge_outcome`).
Same amounts and the same rows as the ORM path, which remains for the other
audit modes and for finalize's backfill.
"""
from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from sqlalchemy import text

from marketplace.audit.service import canonical_json, pending_values
from marketplace.billing.service import q
from marketplace.infra.db import autocommit, get_engine, utcnow
from marketplace.infra.prepared import Prepared
from marketplace.tasks.progress import COMPLETE_CTES, COMPLETE_RESULT, complete_params, was_last

# {gate}: a condition on the other CTEs of the statement (the ledger row only for a subtask that exists).
_CHARGE_CTES = """
    h AS (
        SELECT status FROM holds WHERE task_id = :task_id FOR SHARE
    ), l AS (
        INSERT INTO ledger_entries (user_id, task_id, subtask_id, kind, amount, detail, settled, created_at)
        SELECT :user_id, :task_id, :subtask_id, :kind, :amount, :detail, false, :now
        WHERE CAST(:charge AS boolean) {gate}
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
"""
_CHARGE_RESULT = "(SELECT status FROM h) AS hold_status, EXISTS (SELECT 1 FROM l) AS inserted"
_CHARGE = text(f"WITH {_CHARGE_CTES.format(gate='')} SELECT {_CHARGE_RESULT}")
_COMPLETE_AND_CHARGE = Prepared(
    "mp_complete_and_charge",
    f"WITH {COMPLETE_CTES}, {_CHARGE_CTES.format(gate='AND EXISTS (SELECT 1 FROM s)')} "
    f"SELECT {COMPLETE_RESULT}, {_CHARGE_RESULT} FROM s JOIN tasks t ON t.id = s.task_id",
    types={
        "id": "uuid", "key": "text", "sha": "text", "seconds": "float8", "now": "timestamptz", "topic": "text",
        "sid": "text", "task_id": "uuid", "user_id": "uuid", "subtask_id": "uuid", "kind": "text",
        "amount": "numeric", "detail": "text", "charge": "boolean", "charge_action": "text",
        "charge_subject": "text", "task_key": "text", "charge_data": "text", "ots": "timestamptz",
        "oactor": "text", "oaction": "text", "osubject": "text", "odata": "text",
    },
)


def _params(
    *, user_id: str, task_id: str, subtask_id: str, amount: Decimal | None, ok: bool, detail: str,
    outcome_record: dict[str, Any] | None, now: Any,
) -> dict[str, Any]:
    kind = "charge" if ok else "charge_failed"
    signed = -q(amount) if amount is not None else Decimal("0")
    charge_data = canonical_json({"user_id": user_id, "subtask_id": subtask_id, "amount": str(signed), "detail": detail})
    outcome = pending_values(**outcome_record) if outcome_record else {}
    return {
        "task_id": uuid.UUID(task_id), "user_id": uuid.UUID(user_id), "subtask_id": uuid.UUID(subtask_id),
        "kind": kind, "amount": signed, "detail": detail, "now": now, "charge": amount is not None,
        "charge_action": f"billing.{kind}", "charge_subject": f"subtask:{subtask_id}", "task_key": task_id,
        "charge_data": charge_data,
        "ots": outcome.get("ts"), "oactor": outcome.get("actor"), "oaction": outcome.get("action"),
        "osubject": outcome.get("subject"), "odata": outcome.get("data"),
    }


def charge_outcome(
    *, user_id: str, task_id: str, subtask_id: str, amount: Decimal | None, ok: bool, detail: str,
    outcome_record: dict[str, Any] | None,
) -> tuple[bool, str | None]:
    """Charge `amount` (None: nothing to charge) and write `outcome_record`; returns (inserted, hold status).

    `outcome_record` is `{actor, action, subject, data}` for the subtask's own audit record.
    """
    params = _params(user_id=user_id, task_id=task_id, subtask_id=subtask_id, amount=amount, ok=ok, detail=detail,
                     outcome_record=outcome_record, now=utcnow())
    with get_engine().begin() as conn:
        row = conn.execute(_CHARGE, params).one()
    return bool(row.inserted), row.hold_status


def complete_and_charge(
    *, key: str, sha256: str, seconds: float, user_id: str, task_id: str, subtask_id: str, amount: Decimal | None,
    detail: str, outcome_record: dict[str, Any] | None,
) -> tuple[bool, int, bool, str | None]:
    """`progress.complete_subtask` and `charge_outcome` of its success, in one statement.

    Returns (last open subtask: `progress.was_last`, subtask count, charge inserted, hold status).
    """
    done = complete_params(subtask_id, key=key, sha256=sha256, seconds=seconds)
    params = {**done, **_params(user_id=user_id, task_id=task_id, subtask_id=subtask_id, amount=amount, ok=True,
                                detail=detail, outcome_record=outcome_record, now=done["now"])}
    with autocommit() as conn:  # one statement: it commits by itself
        row = _COMPLETE_AND_CHARGE.execute(conn, params).first()
        if row is None:
            return False, 0, False, None
        return was_last(conn, row), int(row.subtask_count), bool(row.inserted), row.hold_status

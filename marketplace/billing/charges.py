"""A subtask's charge, written by the very statement that records its outcome.

Billing owns the ledger; the lifecycle's statements (`marketplace.tasks.lifecycle`) compose
these fragments with their own, so a subtask is never Done, Failed or stopped without its
charge, and each outcome is one commit. The hold is read FOR SHARE (see
`service.record_subtask_charge` for why), the ledger row is inserted once per subtask and kind
(a redelivery inserts nothing), and its `billing.charge*` audit record is buffered beside it.
"""
from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from marketplace.audit.service import canonical_json
from marketplace.billing.service import price_for, q, subtask_cost
from marketplace.catalog import get_catalog

HOLD_CTE = "h AS (SELECT status FROM holds WHERE task_id = :task_id FOR SHARE)"


def ledger_cte(gate: str = "") -> str:
    """The charge's ledger row (CTE `l`), inserted only where `gate` (a condition on the
    statement's other CTEs, e.g. that the outcome's UPDATE found its row) holds."""
    return f"""l AS (
        INSERT INTO ledger_entries (user_id, task_id, subtask_id, kind, amount, detail, settled, created_at)
        SELECT :user_id, :task_id, :subtask_id, :kind, :amount, :detail, false, :now
        WHERE CAST(:charge AS boolean) {gate}
        ON CONFLICT ON CONSTRAINT uq_ledger_subtask_kind DO NOTHING
        RETURNING id
    )"""


# The charge's audit record, one row where the ledger row was inserted (an `audit.pending_cte` select).
CHARGE_RECORD = "SELECT :now, 'billing', :charge_action, :charge_subject, :task_key, :charge_data FROM l"
RESULT = "(SELECT status FROM h) AS hold_status, EXISTS (SELECT 1 FROM l) AS inserted"
TYPES = {
    "task_id": "uuid", "user_id": "uuid", "subtask_id": "uuid", "kind": "text", "amount": "numeric",
    "detail": "text", "charge": "boolean", "charge_action": "text", "charge_subject": "text", "task_key": "text",
    "charge_data": "text", "now": "timestamptz",
}


def amount_for(*, model: str, device: str, seconds: float, items: int, outcome: str) -> tuple[Decimal | None, str]:
    """(amount, ledger detail) of a subtask's outcome (`done`, `failed` or `stopped`), from the
    price card; None when its model left the catalog (nothing to price it by)."""
    spec = get_catalog().get(model)
    detail = f"{model}/{device} {items} items {seconds or 0:.3f}s" + (" stopped" if outcome == "stopped" else "")
    if spec is None:
        return None, detail
    price = price_for(spec, device)
    if outcome == "stopped":  # its task ended while it ran: the time it ran, no items were delivered
        return q(price.start_fee + Decimal(str(round(seconds, 6))) * price.per_second), detail
    return subtask_cost(price, seconds=seconds, items=items, ok=outcome == "done"), detail


def params(*, user_id: str, task_id: str, subtask_id: str, amount: Decimal | None, ok: bool, detail: str,
           now: Any) -> dict[str, Any]:
    """Bind parameters of `ledger_cte` and CHARGE_RECORD (`amount` None: nothing is charged)."""
    kind = "charge" if ok else "charge_failed"
    signed = -q(amount) if amount is not None else Decimal("0")
    return {
        "task_id": uuid.UUID(task_id), "user_id": uuid.UUID(user_id), "subtask_id": uuid.UUID(subtask_id),
        "kind": kind, "amount": signed, "detail": detail, "now": now, "charge": amount is not None,
        "charge_action": f"billing.{kind}", "charge_subject": f"subtask:{subtask_id}", "task_key": task_id,
        "charge_data": canonical_json({"user_id": user_id, "subtask_id": subtask_id, "amount": str(signed),
                                       "detail": detail}),
    }

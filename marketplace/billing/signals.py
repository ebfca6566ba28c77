"""Charge every finished subtask from Celery's task_success signal.

`workers.run_subtask` never raises out of a chord header; it returns
`{ok, subtask_id, task_id, user_id, model, device, items, seconds, ...}` for success
and failure alike, so `task_success` sees every final outcome. Retries are not final
and are not charged; the unique ledger constraint absorbs redeliveries.
"""
from __future__ import annotations

import logging
import uuid
from typing import Any

from celery.signals import task_success

from marketplace.billing import service
from marketplace.catalog import get_catalog
from marketplace.db import session_scope

logger = logging.getLogger(__name__)
SUBTASK_TASK = "workers.run_subtask"


def charge_outcome(result: dict[str, Any]) -> bool:
    """Record the ledger row for one subtask outcome; True if it was new."""
    if not isinstance(result, dict) or result.get("skipped") or not result.get("subtask_id"):
        return False
    spec = get_catalog().get(result["model"])
    if spec is None:
        return False
    price = service.price_for(spec, result["device"])
    amount = service.subtask_cost(
        price, seconds=float(result.get("seconds") or 0), items=int(result.get("items") or 0), ok=bool(result["ok"])
    )
    with session_scope() as session:
        return service.record_subtask_charge(
            session,
            user_id=uuid.UUID(result["user_id"]),
            task_id=uuid.UUID(result["task_id"]),
            subtask_id=uuid.UUID(result["subtask_id"]),
            amount=amount,
            ok=bool(result["ok"]),
            detail=f"{result['model']}/{result['device']} {result.get('items')} items {result.get('seconds', 0):.3f}s",
        )


@task_success.connect
def _on_subtask_success(sender: Any = None, result: Any = None, **_: Any) -> None:
    if getattr(sender, "name", None) != SUBTASK_TASK:
        return
    try:
        charge_outcome(result)
    except Exception:  # a lost charge must be visible, never silent
        logger.exception("billing: could not record the charge for %s", (result or {}).get("subtask_id"))

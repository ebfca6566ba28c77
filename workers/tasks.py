"""The compute-node task: `workers.run_subtask`, routed to `<device>.<model>` queues."""
from __future__ import annotations

import logging
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from marketplace.infra.celery_app import app
from marketplace.infra.errors import database_unavailable
from marketplace.settings import get_settings
from workers import node, runner  # noqa: F401  (node: capability probe + warm-up signals)

logger = logging.getLogger(__name__)
INFRA_MAX_RETRIES = 60  # a down database or store gets ~30 min of capped backoff


# The outcome's repr (worker log line, task-succeeded event) is cut at RESULT_REPR chars, with
# `ok` and `error` first: Celery builds it with saferepr, ~80 us for a whole outcome (3% of a
# pool child in a fan-out), and the full outcome is the subtask's row.
RESULT_REPR = 160


@app.task(name="workers.run_subtask", bind=True, acks_late=True, max_retries=None, resultrepr_maxsize=RESULT_REPR)
def run_subtask(self, subtask_id: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Never raises out of the chord header (that would silently kill the callback)."""
    settings = get_settings()
    retries = self.request.retries
    try:
        outcome = runner.execute(
            subtask_id, hostname=self.request.hostname or "unknown",
            retries_left=retries < settings.subtask_max_retries, message_id=self.request.id,
        )
    except SoftTimeLimitExceeded:
        outcome = runner.Retry("time limit exceeded")
    except Exception as exc:  # noqa: BLE001 - out of a chord header it would kill the callback silently
        logger.exception("subtask %s: unexpected error, will retry", subtask_id)
        outcome = runner.Retry(f"{type(exc).__name__}: {exc}", infrastructure=database_unavailable(exc))
    if isinstance(outcome, dict) and outcome.pop("finalized", False):
        _leave_chord(self.request)
    if isinstance(outcome, runner.Retry):
        limit = INFRA_MAX_RETRIES if outcome.infrastructure else settings.subtask_max_retries
        if retries < limit:
            countdown = min(30.0, settings.subtask_retry_backoff * (2**retries))
            # Retries jump the queue (0 is served first on Redis): a job waits on its slowest part.
            raise self.retry(countdown=countdown, max_retries=limit, priority=0)
        return {"ok": False, "subtask_id": subtask_id, "skipped": True, "error": outcome.error}
    return {"ok": outcome.get("ok"), **({"error": outcome["error"]} if "error" in outcome else {}), **outcome}


def _leave_chord(request: Any) -> None:
    """This subtask finished its task itself (`runner`'s inline finalize): the chord's callback
    would only find the task final. Drop the chord's keys and leave it uncounted, so no callback
    is sent: for a small job that is a message, a pool process's run and a finalize statement
    fewer. A part of the same chord counted after this finds no chord size and sends nothing."""
    forget = getattr(app.backend, "forget_chord", None)  # marketplace.result_backend's
    if forget is None or not request.chord or not request.group:
        return
    try:
        forget(request.group)
    except Exception:  # the callback runs as before and finds the task final
        logger.warning("could not drop the chord %s of a finished task", request.group, exc_info=True)
        return
    request.chord = None

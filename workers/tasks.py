"""The compute-node task: `workers.run_subtask`, routed to `<device>.<model>` queues."""
from __future__ import annotations

import logging
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from marketplace.infra import names
from marketplace.infra.celery_app import app
from marketplace.infra.errors import database_unavailable
from marketplace.settings import get_settings

# node: capability probe + warm-up signals; backends: a credentialed node's reporter (worker_init)
from workers import backends, node, runner  # noqa: F401

logger = logging.getLogger(__name__)
INFRA_MAX_RETRIES = 60  # a down database or store gets ~30 min of capped backoff
ELSEWHERE_BACKOFF = 0.05  # seconds, doubled per retry up to 1: a message this node may not run
# A message for another node (verified results: the one provider's node that may run it is busy
# with a long run) bounces between the nodes that may not, a second apart, for up to ~15 min before
# it is left to recovery: at INFRA_MAX_RETRIES (~1 min of bounces) it was dropped while its node
# was still busy, and the task waited for recovery's stall deadline.
ELSEWHERE_MAX_RETRIES = 900


# The outcome's repr (worker log line, task-succeeded event) is cut at RESULT_REPR chars, with
# `ok` and `error` first: Celery builds it with saferepr, ~80 us for a whole outcome (3% of a
# pool child in a fan-out), and the full outcome is the subtask's row.
RESULT_REPR = 160


@app.task(name=names.RUN_SUBTASK, bind=True, acks_late=True, max_retries=None, resultrepr_maxsize=RESULT_REPR)
def run_subtask(self, subtask_id: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Never raises: every outcome is recorded on the subtask's row and returned as a dict."""
    settings = get_settings()
    retries = self.request.retries
    try:
        outcome = runner.execute(
            subtask_id, hostname=self.request.hostname or "unknown",
            retries_left=retries < settings.subtask_max_retries, message_id=self.request.id,
        )
    except SoftTimeLimitExceeded:
        outcome = runner.Retry("time limit exceeded")
    except Exception as exc:  # noqa: BLE001 - recorded as a retry, then a failure, never lost
        logger.exception("subtask %s: unexpected error, will retry", subtask_id)
        outcome = runner.Retry(f"{type(exc).__name__}: {exc}", infrastructure=database_unavailable(exc))
    if isinstance(outcome, runner.Retry):
        limit = (ELSEWHERE_MAX_RETRIES if outcome.elsewhere else INFRA_MAX_RETRIES if outcome.infrastructure
                 else settings.subtask_max_retries)
        if retries < limit:
            countdown = min(30.0, settings.subtask_retry_backoff * (2**retries))
            if outcome.elsewhere:  # another node runs it: no failure to back off from
                countdown = min(1.0, ELSEWHERE_BACKOFF * (2**retries))
            # Retries jump the queue (0 is served first on Redis): a job waits on its slowest part.
            # Not for this node: to the shared queue, even where it came by this node's own.
            where = {"queue": outcome.queue} if outcome.elsewhere and outcome.queue else {}
            raise self.retry(countdown=countdown, max_retries=limit, priority=0, **where)
        return {"ok": False, "subtask_id": subtask_id, "skipped": True, "error": outcome.error}
    return {"ok": outcome.get("ok"), **({"error": outcome["error"]} if "error" in outcome else {}), **outcome}

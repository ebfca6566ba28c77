"""Webhooks: POST the task document to the task's `webhook_url` on a final status, signed.

`Marketplace-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + the raw body, keyed by
the user's webhook_secret>` (shown in `GET /v1/me`); receivers check it with
`marketplace.webhooks.signing.verify` (5 minutes' tolerance, so a captured delivery cannot be
replayed later). The deprecated `X-Marketplace-Signature: sha256=<HMAC of the body>` is still
sent for receivers not yet moved. Delivery is a Celery task on
`marketplace.maintenance`, sent after the final status commits, retried with
exponential backoff a bounded number of times. Only to public addresses, unless the
deployment allows more for the task's owner (`marketplace/webhook_targets.py`).
"""
from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from marketplace.billing.service import SETTLE_WAIT_SECONDS
from marketplace.infra import names
from marketplace.infra.celery_app import app
from marketplace.webhooks import signing
from marketplace.webhooks.targets import private_allowed, public_session, resolved_refusal

logger = logging.getLogger(__name__)
EVENTS = {"Done": "task.completed", "Failed": "task.failed", "Cancelled": "task.cancelled"}


# Deprecated names of the legacy (timeless) signature; receivers use `signing.verify`.
sign, verify = signing.legacy_sign, signing.legacy_verify


def build_delivery(task_id: str) -> tuple[str, bytes, dict[str, str], bool] | None:
    """(url, body, headers, private_ok) for a finished task with a webhook, else None;
    `private_ok`: its owner may deliver to non-public addresses (`private_allowed`)."""
    from marketplace.infra.db import session_scope
    from marketplace.tasks.models import Task, TaskStatus
    from marketplace.tasks.service import describe_task
    from marketplace.users.models import User

    with session_scope() as session:
        task = session.get(Task, uuid.UUID(task_id))
        if task is None or not task.webhook_url or not TaskStatus(task.status).final:
            return None
        user = session.get(User, task.user_id)
        if user is None:
            return None
        doc = describe_task(session, task=task).model_dump(mode="json")
        body = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "marketplace-webhooks/1",
            "X-Marketplace-Event": EVENTS.get(task.status, "task.finished"),
            "X-Marketplace-Delivery": task_id,
            signing.HEADER: signing.sign(user.webhook_secret, body),
            signing.LEGACY_HEADER: signing.legacy_sign(user.webhook_secret, body),  # deprecated
        }
        return task.webhook_url, body, headers, private_allowed(owner_is_admin=user.is_admin)


def post(url: str, body: bytes, headers: dict[str, str], *, timeout: float,
         private_ok: bool = False) -> tuple[bool, bool, str]:
    """POST once: (delivered, worth retrying, what happened); to public addresses only unless `private_ok`."""
    import requests

    try:
        refused = resolved_refusal(url, private_ok=private_ok)
    except OSError as exc:  # the name does not resolve now: worth a retry, like a refused connection
        return False, True, f"cannot resolve the webhook host: {exc}"
    if refused:
        return False, False, refused
    try:
        with public_session(private_ok=private_ok) as session:
            resp = session.post(url, data=body, headers=headers, timeout=timeout, allow_redirects=False)
    except requests.RequestException as exc:
        return False, True, f"{type(exc).__name__}: {exc}"
    if 200 <= resp.status_code < 300:
        return True, False, f"HTTP {resp.status_code}"
    retry = resp.status_code >= 500 or resp.status_code in (408, 429)
    return False, retry, f"HTTP {resp.status_code}"


# A cancelled task's running subtasks finish, and are charged, after the cancel: the document is
# built once nothing is left to settle (polled this often, for at most billing's
# SETTLE_WAIT_SECONDS), or a receiver stored a cost that then went up.
SETTLE_POLL_SECONDS = 1.0


@app.task(name=names.DELIVER_WEBHOOK, bind=True, acks_late=True, max_retries=None)
def deliver(self: Any, task_id: str, settle_waits: int = 0) -> dict[str, Any]:
    from marketplace.settings import get_settings

    settings = get_settings()
    if settle_waits * SETTLE_POLL_SECONDS < SETTLE_WAIT_SECONDS and _settling(task_id):
        raise self.retry(countdown=SETTLE_POLL_SECONDS, kwargs={"task_id": task_id, "settle_waits": settle_waits + 1})
    delivery = build_delivery(task_id)
    if delivery is None:
        return {"ok": False, "skipped": True}
    url, body, headers, private_ok = delivery
    ok, retry, note = post(url, body, headers, timeout=settings.webhook_timeout, private_ok=private_ok)
    failures = self.request.retries - settle_waits  # the delivery's own retries, not the waits
    attempt = failures + 1
    if ok:
        _done(task_id)
        return {"ok": True, "attempts": attempt, "status": note}
    if retry and failures < settings.webhook_max_retries:
        countdown = settings.webhook_retry_backoff * (2 ** failures)
        logger.warning("webhook for task %s failed (%s); retry %d in %.1fs", task_id, note, attempt, countdown)
        raise self.retry(countdown=countdown, kwargs={"task_id": task_id, "settle_waits": settle_waits})
    logger.error("webhook for task %s not delivered after %d attempt(s): %s", task_id, attempt, note)
    _done(task_id)
    return {"ok": False, "attempts": attempt, "error": note}


def _settling(task_id: str) -> bool:
    from marketplace.billing.service import still_settling
    from marketplace.infra.db import session_scope

    with session_scope() as session:
        return still_settling(session, task_id=uuid.UUID(task_id))


def _done(task_id: str) -> None:
    """The delivery ended (delivered, refused or out of retries): recovery leaves it alone."""
    from sqlalchemy import text

    from marketplace.infra.db import autocommit, utcnow

    with autocommit() as conn:
        conn.execute(text("UPDATE tasks SET webhook_done_at = :now WHERE id = :id"),
                     {"now": utcnow(), "id": uuid.UUID(task_id)})


def stall_seconds() -> float:
    """How long a delivery may take before recovery takes it for lost: every attempt timing out
    and every backoff waited, plus a margin, and never under recovery's own stall deadline."""
    from marketplace.settings import get_settings

    s = get_settings()
    backoffs = sum(s.webhook_retry_backoff * 2**i for i in range(s.webhook_max_retries))
    return max(s.recovery_stall_seconds,
               SETTLE_WAIT_SECONDS + backoffs + (s.webhook_max_retries + 1) * s.webhook_timeout + 30)

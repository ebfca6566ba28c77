"""Work that must wait for a transaction's commit: messages, revokes, webhook deliveries.

One mechanism for every door: `defer(session, fn, *args)` keeps the call with the session's
transaction, and SQLAlchemy's `after_commit` event runs it once the commit went through. A
rollback (of the transaction, or of the savepoint it was deferred in) drops it, as it drops the
rows the call was about. A deferred call that raises is logged, never raised into the commit:
what it sends is committed work's follow-up, and recovery re-sends what went missing.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session

from marketplace.infra.db import take_buffer, transaction_buffer

logger = logging.getLogger(__name__)
_KEY = "marketplace.after_commit"


def defer(session: Session, fn: Callable[..., Any], *args: Any) -> None:
    """Call `fn(*args)` after `session`'s transaction commits (not at all if it rolls back)."""
    transaction_buffer(session, _KEY).append((fn, args))


@event.listens_for(Session, "after_commit")
def _run_deferred(session: Session) -> None:
    if session.get_nested_transaction() is not None:
        return  # a savepoint's release: the work waits for the transaction's own commit
    for fn, args in take_buffer(session, _KEY):
        try:
            fn(*args)
        except Exception:  # the commit stands; recovery re-sends what this would have sent
            logger.exception("after commit: %s%r failed", getattr(fn, "__qualname__", fn), args)

"""Polling for a condition that other processes make true."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(predicate: Callable[[], Any], timeout: float = 60.0, what: str | Callable[[], str] = "condition", *,
               interval: float = 0.2) -> Any:
    """The first truthy value of `predicate()`; AssertionError naming `what` after `timeout` seconds
    (a callable `what` is asked at that moment, to say what was seen instead)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what() if callable(what) else what}")
        time.sleep(interval)


def backends_waiting_on_locks() -> int:
    """How many of the test database's backends wait on a lock (to line up a race)."""
    from sqlalchemy import text

    from marketplace.infra.db import get_engine

    with get_engine().connect() as conn:
        return conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )).scalar_one()

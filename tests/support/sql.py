"""What this process sends to the database, for tests that count or inspect statements."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import event


def statements_of(fn: Callable[[], Any]) -> tuple[Any, list[str]]:
    """`fn()`'s result and the statements this process's engine ran meanwhile, whitespace folded."""
    from marketplace.infra.db import get_engine

    seen: list[str] = []

    def spy(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        seen.append(" ".join(statement.split()))

    event.listen(get_engine(), "before_cursor_execute", spy)
    try:
        return fn(), seen
    finally:
        event.remove(get_engine(), "before_cursor_execute", spy)

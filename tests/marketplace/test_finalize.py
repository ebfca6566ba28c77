"""Finalize on real Postgres and the test object store: what it reads, and what it writes."""
from __future__ import annotations

import json

from sqlalchemy import event

from tests.support.api import register
from tests.support.progress import ran_uncharged, stored_task


def _statements_of(fn):  # type: ignore[no-untyped-def]
    from marketplace.db import get_engine

    seen: list[str] = []

    def spy(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        seen.append(" ".join(statement.split()))

    event.listen(get_engine(), "before_cursor_execute", spy)
    try:
        return fn(), seen
    finally:
        event.remove(get_engine(), "before_cursor_execute", spy)


def test_finalize_locks_the_task_and_reads_its_parts_in_one_statement(client):  # type: ignore[no-untyped-def]
    from marketplace.results.service import finalize_task, result_key
    from marketplace.storage import get_store

    user = register(client)
    task_id, _ = ran_uncharged(user["id"], ["a", {"b": 2}, 3])
    outcome, statements = _statements_of(lambda: finalize_task(task_id))
    assert outcome == "done"
    first_write = next(i for i, s in enumerate(statements) if "holds" in s)  # settlement's first step
    assert first_write == 1, statements[:first_write]
    assert "FOR UPDATE OF tasks" in statements[0] and "subtasks" in statements[0]
    document = json.loads(get_store().get_bytes(result_key(task_id)))
    assert document["outputs"] == ["a", {"b": 2}, 3]


def test_finalize_waits_for_a_subtask_that_is_not_final(client):  # type: ignore[no-untyped-def]
    from marketplace.results.service import finalize_task
    from marketplace.tasks import progress

    user = register(client)
    task_id, sub_ids = stored_task(user["id"], ["a", "b"])
    early, _ = progress.claim_subtask(sub_ids[1], hostname="finalize@test", message_id=f"{sub_ids[1]}:1")
    assert early is None
    assert finalize_task(task_id) == "waiting"

"""Hot statements are parsed and planned once per connection, and survive what a pool does to one."""
from __future__ import annotations

import uuid

import pytest

from tests.support.api import register
from tests.support.progress import stored_task


def _prepared_on(conn) -> set[str]:  # type: ignore[no-untyped-def]
    return set(conn.exec_driver_sql("SELECT name FROM pg_prepared_statements").scalars())


def _prepared_anywhere(engine) -> set[str]:  # type: ignore[no-untyped-def]
    """The prepared statements of every idle connection in the engine's pool."""
    conns = [engine.connect() for _ in range(max(1, engine.pool.checkedin()))]
    try:
        return set().union(*(_prepared_on(c) for c in conns))
    finally:
        for c in conns:
            c.close()


def test_a_statement_is_prepared_once_per_connection_and_run_by_name(stack):  # type: ignore[no-untyped-def]
    from marketplace.db import get_engine
    from marketplace.prepared import Prepared

    stmt = Prepared("mp_test_echo", "SELECT CAST(:n AS int) + :n AS twice, (:label)::text || '!' AS label",
                    types={"n": "int", "label": "text"})
    assert stmt.params == ["n", "label"]  # `::text` is a cast, not a parameter
    with get_engine().connect() as conn:
        assert stmt.execute(conn, {"n": 2, "label": "a"}).one() == (4, "a!")
        assert stmt.execute(conn, {"n": 5, "label": "b"}).one() == (10, "b!")
        rows = conn.exec_driver_sql(
            "SELECT count(*) FROM pg_prepared_statements WHERE name = 'mp_test_echo'").scalar()
        assert rows == 1


def test_a_prepared_statement_outlives_a_rollback_and_comes_back_after_a_reconnect(stack):  # type: ignore[no-untyped-def]
    from marketplace.db import get_engine
    from marketplace.prepared import Prepared

    stmt = Prepared("mp_test_rollback", "SELECT :x AS x", types={"x": "text"})
    with get_engine().connect() as conn:
        with conn.begin() as tx:
            assert stmt.execute(conn, {"x": "first"}).scalar() == "first"
            tx.rollback()  # PREPARE is not transactional: the name stays on the connection
        assert stmt.execute(conn, {"x": "again"}).scalar() == "again"
        conn.invalidate()  # a dead connection: the pool connects anew, and forgets what it prepared
        conn.rollback()
        assert "mp_test_rollback" not in _prepared_on(conn)
        assert stmt.execute(conn, {"x": "after"}).scalar() == "after"


def test_every_parameter_needs_a_type():  # type: ignore[no-untyped-def]
    from marketplace.prepared import Prepared

    with pytest.raises(ValueError, match="no type for b"):
        Prepared("mp_test_untyped", "SELECT :a, :b", types={"a": "int"})


def test_a_subtask_claims_and_completes_through_prepared_statements(client):  # type: ignore[no-untyped-def]
    from marketplace.db import get_engine, session_scope
    from marketplace.tasks.models import SubTask
    from workers import runner

    user = register(client)
    _task_id, (sid, _other) = stored_task(user["id"], ["a", "b"])
    result = runner.execute(sid, hostname="prepared@test", retries_left=True, message_id=f"{sid}:1")
    assert result["ok"] and result["charged"], result
    assert {"mp_claim_pending", "mp_complete_and_charge"} <= _prepared_anywhere(get_engine())
    with session_scope() as session:
        sub = session.get(SubTask, uuid.UUID(sid))
        assert (sub.status, sub.worker, sub.attempts, sub.result_sha256) == (
            "Done", "prepared@test", 1, result["sha256"])


def test_the_claim_and_the_completion_each_commit_by_themselves(client):  # type: ignore[no-untyped-def]
    """One round trip each: psycopg2 in a transaction sends BEGIN and COMMIT as two more."""
    from sqlalchemy import event

    from marketplace.db import get_engine
    from workers import runner

    user = register(client)
    _task_id, (sid, _other) = stored_task(user["id"], ["a", "b"])
    seen: list[tuple[str, bool]] = []

    def spy(conn, _cursor, statement, *_args):  # type: ignore[no-untyped-def]
        seen.append((statement.split("(")[0].strip(), conn.connection.dbapi_connection.autocommit))

    engine = get_engine()
    event.listen(engine, "before_cursor_execute", spy)
    try:
        result = runner.execute(sid, hostname="autocommit@test", retries_left=True, message_id=f"{sid}:1")
    finally:
        event.remove(engine, "before_cursor_execute", spy)
    assert result["ok"] and result["charged"], result
    hot = [entry for entry in seen if entry[0].startswith("EXECUTE mp_")]
    assert hot == [("EXECUTE mp_claim_pending", True), ("EXECUTE mp_complete_and_charge", True)], seen


def test_a_new_connection_starts_idle_so_its_first_use_can_commit_by_itself(stack):  # type: ignore[no-untyped-def]
    """The connect hook's `SET statement_timeout` must not leave a transaction open (psycopg2
    refuses autocommit inside one: a pool child's first claim failed with it)."""
    from marketplace.db import autocommit, get_engine

    get_engine().dispose()  # the next checkout connects anew
    with autocommit() as conn:
        assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "30s"

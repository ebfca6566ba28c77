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
    from marketplace.infra.db import get_engine
    from marketplace.infra.prepared import Prepared

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
    from marketplace.infra.db import get_engine
    from marketplace.infra.prepared import Prepared

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
    from marketplace.infra.prepared import Prepared

    with pytest.raises(ValueError, match="no type for b"):
        Prepared("mp_test_untyped", "SELECT :a, :b", types={"a": "int"})


def test_a_subtask_claims_and_completes_through_prepared_statements(client):  # type: ignore[no-untyped-def]
    from marketplace.infra.db import get_engine, session_scope
    from marketplace.tasks.models import SubTask
    from workers import runner

    user = register(client)
    _task_id, (sid, _other) = stored_task(user["id"], ["a", "b"])
    result = runner.execute(sid, hostname="prepared@test", retries_left=True, message_id=f"{sid}:1")
    assert result["ok"], result
    assert {"mp_claim_pending", "mp_complete"} <= _prepared_anywhere(get_engine())
    with session_scope() as session:
        sub = session.get(SubTask, uuid.UUID(sid))
        assert (sub.status, sub.worker, sub.attempts, sub.result_sha256) == (
            "Done", "prepared@test", 1, result["sha256"])


def test_the_claim_and_the_completion_each_commit_by_themselves(client):  # type: ignore[no-untyped-def]
    """One round trip each: psycopg2 in a transaction sends BEGIN and COMMIT as two more."""
    from sqlalchemy import event

    from marketplace.infra.db import get_engine
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
    assert result["ok"], result
    hot = [entry for entry in seen if entry[0].startswith("EXECUTE mp_")]
    assert hot == [("EXECUTE mp_claim_pending", True), ("EXECUTE mp_complete", True)], seen


def test_a_new_connection_starts_idle_so_its_first_use_can_commit_by_itself(stack):  # type: ignore[no-untyped-def]
    """The connect hook's `SET statement_timeout` must not leave a transaction open (psycopg2
    refuses autocommit inside one: a pool child's first claim failed with it)."""
    from marketplace.infra.db import autocommit, get_engine

    get_engine().dispose()  # the next checkout connects anew
    with autocommit() as conn:
        assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "30s"


def test_rows_read_on_the_driver_cursor_are_those_sqlalchemy_reads(stack):  # type: ignore[no-untyped-def]
    """Nothing listens to statements: the driver's cursor (no result metadata built); a listener
    (SQL tracing): SQLAlchemy's own path. Callers read the same rows from both."""
    from sqlalchemy import event

    from marketplace.infra.db import get_engine
    from marketplace.infra.prepared import Prepared, Rows

    stmt = Prepared("mp_test_rows", "SELECT g AS n, CAST(:label AS text) || g AS label, NULL AS nothing "
                                    "FROM generate_series(1, CAST(:count AS int)) AS g",
                    types={"label": "text", "count": "int"})
    engine = get_engine()

    def read() -> list[object]:
        with engine.connect() as conn:
            result = stmt.execute(conn, {"label": "x", "count": 2})
            rows = result.all()
            one = stmt.execute(conn, {"label": "y", "count": 1})
            none = stmt.execute(conn, {"label": "z", "count": 0})
            return [type(result) is Rows, [tuple(r) for r in rows], [(r.n, r.label, r.nothing) for r in rows],
                    tuple(one.one()), stmt.execute(conn, {"label": "y", "count": 1}).scalar_one(),
                    none.first(), stmt.execute(conn, {"label": "z", "count": 0}).scalar()]

    raw = read()
    seen: list[str] = []
    listener = lambda _conn, _cursor, statement, *_args: seen.append(statement)  # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    try:
        through_sqlalchemy = read()
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    assert raw[0] is True and through_sqlalchemy[0] is False
    assert raw[1:] == through_sqlalchemy[1:] == [
        [(1, "x1", None), (2, "x2", None)], [(1, "x1", None), (2, "x2", None)], (1, "y1", None), 1, None, None]
    assert "EXECUTE mp_test_rows(%s, %s)" in seen  # the listener saw the statement


def test_errors_on_the_driver_cursor_are_sqlalchemys_and_a_dropped_connection_is_replaced(stack):  # type: ignore[no-untyped-def]
    from sqlalchemy import exc

    from marketplace.infra.db import get_engine
    from marketplace.infra.prepared import Prepared

    stmt = Prepared("mp_test_errors", "SELECT 1 / CAST(:d AS int) AS q", types={"d": "int"})
    engine = get_engine()
    with engine.connect() as conn:
        with pytest.raises(exc.DataError, match="division by zero"):
            stmt.execute(conn, {"d": 0})
        conn.rollback()
        assert stmt.execute(conn, {"d": 1}).scalar_one() == 1
        with pytest.raises(exc.NoResultFound):
            Prepared("mp_test_none", "SELECT 1 WHERE false", types={}).execute(conn, {}).one()
        with pytest.raises(exc.MultipleResultsFound):
            Prepared("mp_test_many", "SELECT generate_series(1, 2)", types={}).execute(conn, {}).scalar_one()
        conn.commit()
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        conn.commit()
        with engine.connect() as killer:
            killer.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")
        with pytest.raises(exc.OperationalError) as dropped:
            stmt.execute(conn, {"d": 1})
        assert dropped.value.connection_invalidated
    with engine.connect() as conn:  # the pool connects anew and prepares again
        assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() != pid
        assert stmt.execute(conn, {"d": 2}).scalar_one() == 0

"""SQLAlchemy engine and sessions: one engine per process, built lazily."""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import JSON, DateTime, Numeric, create_engine, event, exc
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from marketplace.infra import prepared

# Money: 18 digits, 6 after the point; never floats.
Money = Numeric(24, 6)
JSONType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> uuid.UUID:
    return uuid.uuid4()


class Base(DeclarativeBase):
    type_annotation_map = {
        datetime: DateTime(timezone=True),
        Decimal: Money,
        dict[str, Any]: JSONType,
        list[Any]: JSONType,
    }


_engine: Engine | None = None
_sessionmaker: sessionmaker[Session] | None = None


def init_engine(url: str | None = None, **kwargs: Any) -> Engine:
    """(Re)build this process's engine; call after fork (workers do it in worker_process_init)."""
    global _engine, _sessionmaker
    if _engine is not None:
        _engine.dispose(close=False)
    from marketplace.settings import get_settings, psycopg2_url

    settings = get_settings()
    if settings.is_node and url is None:
        raise RuntimeError("a credentialed node has no database: the platform records its work (NodeService)")
    kwargs.setdefault("pool_size", 5)
    kwargs.setdefault("max_overflow", 10)
    _engine = create_engine(psycopg2_url(url or settings.database_url), **kwargs)
    _sessionmaker = sessionmaker(bind=_engine, expire_on_commit=False)
    if settings.database_transaction_pooling:
        # Each transaction may run on another server connection: nothing may rely on a session's
        # state. The statement timeout is then the role's (`ALTER ROLE ... SET`, in the README).
        prepared.send_inline(_engine)
    else:
        _statement_timeout(_engine)
    _ping_when_idle(_engine)
    return _engine


# A pooled connection is checked with a round trip before use only when it sat in the pool this
# long. SQLAlchemy's `pool_pre_ping` pings at every checkout: a round trip per request in the API
# and one per statement group of a subtask (three per subtask), for connections used a moment
# ago. One that died within this window (the server restarted between two uses) fails its first
# statement instead: a disconnect error, which invalidates the pool; the API answers 503 and a
# worker retries the task, as when the server dies mid-transaction.
PING_AFTER_IDLE_S = 1.0
_RETURNED_AT = "marketplace_returned_at"


def _ping_when_idle(engine: Engine) -> None:
    @event.listens_for(engine, "checkin")
    def _returned(_dbapi_conn: Any, record: Any) -> None:
        if record is not None:
            record.info[_RETURNED_AT] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        returned = record.info.get(_RETURNED_AT)  # none yet: a new connection, just opened
        if returned is None or time.monotonic() - returned < PING_AFTER_IDLE_S:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except engine.dialect.loaded_dbapi.Error as err:
            if not engine.dialect.is_disconnect(err, dbapi_conn, None):
                raise
            # What pre-ping does: drop every connection as old as this one and open a new one.
            raise exc.InvalidatePoolError(str(err)) from err


def _statement_timeout(engine: Engine) -> None:
    # Statement timeout keeps a stuck lock from hanging a web worker forever.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:  # pragma: no cover - trivial
        if engine.dialect.name == "postgresql":
            with dbapi_conn.cursor() as cur:
                cur.execute("SET statement_timeout = 30000")
            dbapi_conn.commit()  # psycopg2 began a transaction for it: a new connection starts idle


def get_engine() -> Engine:
    if _engine is None:
        init_engine()
    assert _engine is not None
    return _engine


def dispose_engine() -> None:
    global _engine, _sessionmaker
    if _engine is not None:
        _engine.dispose()
    _engine = None
    _sessionmaker = None


def new_session() -> Session:
    if _sessionmaker is None:
        init_engine()
    assert _sessionmaker is not None
    return _sessionmaker()


@contextmanager
def autocommit() -> Iterator[Connection]:
    """A connection on which each statement commits by itself, for one-statement writes.

    psycopg2 sends BEGIN and COMMIT as round trips of their own: a one-statement
    transaction is three, this is one. Only for a single statement (CTEs make one
    statement atomic); anything that must commit with something else takes a transaction.
    The driver's flag is flipped directly: SQLAlchemy's `isolation_level="AUTOCOMMIT"`
    option resets the connection on return with a `SET default_transaction_isolation`,
    a round trip of its own (pg_stat_statements: two per subtask).
    """
    with get_engine().connect() as conn:
        driver = conn.connection.dbapi_connection
        driver.autocommit = True  # client-side only: psycopg2 sends nothing for it
        try:
            yield conn
        finally:
            if not driver.closed:  # a connection the server dropped is discarded by the pool anyway
                driver.autocommit = False


# Rows a transaction writes at its commit (audit records, outbox events), kept in the session
# until its `before_commit` hooks take them. `transaction_buffer` begins the transaction if none
# is open (no database work: that waits for the first statement), so that a rollback before any
# statement is seen. The outermost transaction's end (commit, rollback or close) drops what the
# hooks did not take; a savepoint's rollback drops what was added inside it, as it would the rows.
_BUFFERS = "marketplace.buffers"  # key -> rows
_SAVEPOINTS = "marketplace.buffers.savepoints"  # id(savepoint) -> {key: rows before it}


def transaction_buffer(session: Session, key: str) -> list[Any]:
    """The rows under `key` that `session`'s transaction writes at its commit (append to it)."""
    if not session.in_transaction():
        session.begin()
    return session.info.setdefault(_BUFFERS, {}).setdefault(key, [])  # type: ignore[no-any-return]


def take_buffer(session: Session, key: str) -> list[Any]:
    """The rows under `key`, removed (the caller writes them)."""
    return session.info.get(_BUFFERS, {}).pop(key, [])  # type: ignore[no-any-return]


@event.listens_for(Session, "after_transaction_create")
def _mark_savepoint(session: Session, transaction: Any) -> None:
    if transaction.nested:
        session.info.setdefault(_SAVEPOINTS, {})[id(transaction)] = {
            key: len(rows) for key, rows in session.info.get(_BUFFERS, {}).items()}


@event.listens_for(Session, "after_soft_rollback")
def _drop_savepoints_rows(session: Session, previous_transaction: Any) -> None:
    if previous_transaction.nested:
        before = session.info.get(_SAVEPOINTS, {}).pop(id(previous_transaction), None)
        if before is not None:
            for key, rows in session.info.get(_BUFFERS, {}).items():
                del rows[before.get(key, 0):]


@event.listens_for(Session, "after_transaction_end")
def _drop_rows(session: Session, transaction: Any) -> None:
    if transaction.parent is None:
        session.info.pop(_BUFFERS, None)
        session.info.pop(_SAVEPOINTS, None)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session in a transaction: committed on success, rolled back on error."""
    session = new_session()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()

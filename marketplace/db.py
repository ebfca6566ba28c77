"""SQLAlchemy engine and sessions: one engine per process, built lazily."""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import JSON, DateTime, Numeric, create_engine, event
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

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
    if url is None:
        from marketplace.settings import get_settings

        url = get_settings().database_url
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 5)
    kwargs.setdefault("max_overflow", 10)
    _engine = create_engine(url, **kwargs)
    _sessionmaker = sessionmaker(bind=_engine, expire_on_commit=False)
    _instrument(_engine)
    return _engine


def _instrument(engine: Engine) -> None:
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

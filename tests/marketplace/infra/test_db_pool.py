"""Pooled connections are checked with a round trip only after sitting idle (`marketplace/db.py`)."""
from __future__ import annotations

import pytest
from sqlalchemy import create_engine, exc
from sqlalchemy.pool import NullPool


def _backend_pid(engine) -> int:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()


def _terminate(pid: int) -> None:
    """Drop a backend from another connection, as a server restart would."""
    from marketplace.settings import get_settings

    killer = create_engine(get_settings().database_url, poolclass=NullPool)
    with killer.connect() as conn:
        assert conn.exec_driver_sql(f"SELECT pg_terminate_backend({pid})").scalar()
    killer.dispose()


@pytest.fixture()
def pings(monkeypatch):  # type: ignore[no-untyped-def]
    """A list that gets one entry per ping of this process's engine."""
    from marketplace.infra.db import get_engine

    dialect = type(get_engine().dialect)
    original = dialect.do_ping
    sent: list[int] = []

    def counting(self, dbapi_conn):  # type: ignore[no-untyped-def]
        sent.append(1)
        return original(self, dbapi_conn)

    monkeypatch.setattr(dialect, "do_ping", counting)
    return sent


def test_a_connection_used_a_moment_ago_is_not_pinged(stack, pings):  # type: ignore[no-untyped-def]
    from marketplace.infra.db import get_engine

    engine = get_engine()
    engine.dispose()
    pid = _backend_pid(engine)  # a new connection: nothing to check either
    assert [_backend_pid(engine) for _ in range(3)] == [pid] * 3
    assert pings == []


def test_an_idle_connection_is_pinged_and_one_the_server_dropped_is_replaced(stack, pings, monkeypatch):  # type: ignore[no-untyped-def]
    from marketplace.infra import db

    monkeypatch.setattr(db, "PING_AFTER_IDLE_S", 0.0)
    engine = db.get_engine()
    engine.dispose()
    pid = _backend_pid(engine)
    assert _backend_pid(engine) == pid and len(pings) == 1  # alive: pinged, kept
    _terminate(pid)
    assert _backend_pid(engine) != pid  # no error: the ping found it dead and the pool connected anew
    assert len(pings) == 2


def test_within_the_window_a_dropped_connection_fails_once_as_a_disconnect(stack, pings):  # type: ignore[no-untyped-def]
    """The price of not pinging: the first use of a connection the server dropped a moment after
    its last use fails (the API answers 503, a worker retries); the pool then connects anew."""
    from marketplace.infra.db import get_engine

    engine = get_engine()
    engine.dispose()
    pid = _backend_pid(engine)
    _terminate(pid)
    with pytest.raises(exc.OperationalError) as dropped:
        _backend_pid(engine)
    assert dropped.value.connection_invalidated
    assert _backend_pid(engine) != pid
    assert pings == []


def test_an_exhausted_pool_is_a_503_with_retry_after_not_a_500(client):  # type: ignore[no-untyped-def]
    """Every pooled connection busy past `pool_timeout` (a slow database under load) raised
    SQLAlchemy's TimeoutError, which the API answered as a 500."""
    from marketplace.infra.db import get_engine, init_engine
    from tests.support.api import register

    user = register(client)
    init_engine(pool_size=1, max_overflow=0, pool_timeout=0.2)
    held = get_engine().connect()
    try:
        resp = client.get("/v1/me", headers=user["headers"])
        assert resp.status_code == 503, resp.get_data(as_text=True)
        assert resp.headers.get("Retry-After")
        assert "database" in resp.get_json()["detail"]
    finally:
        held.close()
        init_engine()
    assert client.get("/v1/me", headers=user["headers"]).status_code == 200

"""A PostgreSQL URL in any of the spellings tools print works wherever the marketplace reads one."""
from __future__ import annotations

import pytest
from sqlalchemy import text

from marketplace.settings import Settings, psycopg2_url

PSYCOPG2 = "postgresql+psycopg2://mp:pw@db.example:5433/mp?sslmode=require"


@pytest.mark.parametrize("given", [
    "postgresql://mp:pw@db.example:5433/mp?sslmode=require",  # psql, pg_dump, pgserver
    "postgres://mp:pw@db.example:5433/mp?sslmode=require",  # Heroku, Render, Fly
    "postgresql+psycopg2://mp:pw@db.example:5433/mp?sslmode=require",
    "postgresql+psycopg://mp:pw@db.example:5433/mp?sslmode=require",  # psycopg 3, not installed
    "postgres+psycopg2://mp:pw@db.example:5433/mp?sslmode=require",
    "PostgreSQL://mp:pw@db.example:5433/mp?sslmode=require",
    "  postgresql://mp:pw@db.example:5433/mp?sslmode=require\n",  # pasted from a terminal
])
def test_every_postgresql_spelling_becomes_the_psycopg2_url(given: str) -> None:
    assert psycopg2_url(given) == PSYCOPG2
    assert Settings(database_url=given).database_url == PSYCOPG2


def test_the_host_in_a_socket_path_and_other_schemes_are_left_alone() -> None:
    assert psycopg2_url("postgresql:///mp?host=/var/run/postgresql") == \
        "postgresql+psycopg2:///mp?host=/var/run/postgresql"
    assert psycopg2_url("sqlite:///x.db") == "sqlite:///x.db"
    # Only the scheme: a password may hold anything.
    assert psycopg2_url("postgres://u:postgres://x@h/d") == "postgresql+psycopg2://u:postgres://x@h/d"


def test_the_environment_variable_is_normalised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARKETPLACE_DATABASE_URL", "postgres://u@h/d")
    assert Settings().database_url == "postgresql+psycopg2://u@h/d"


def test_an_engine_and_migrations_from_a_plain_url_reach_the_database(postgres) -> None:  # type: ignore[no-untyped-def]
    """`init_engine(url)` and Alembic (`marketplace db ...`) take the URL as psql prints it."""
    from marketplace.infra import db, migrate

    assert postgres.plain_url.startswith("postgresql://")
    engine = db.init_engine(postgres.plain_url)
    try:
        assert engine.dialect.driver == "psycopg2"
        with db.session_scope() as session:
            assert session.scalar(text("SELECT 1")) == 1
        migrate.upgrade(postgres.plain_url)  # at head already: it connects, finds nothing to do
        migrate.upgrade(postgres.plain_url.replace("postgresql://", "postgres://", 1))
    finally:
        db.init_engine()  # the session's engine again, from the settings

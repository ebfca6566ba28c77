"""Alembic owns the schema: the migration chain builds exactly what the models declare."""
from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from tests.support.servers import Postgres


def test_migrations_build_the_schema_the_models_declare() -> None:
    import marketplace.infra.celery_app  # noqa: F401  (imports every model module)
    from marketplace.infra import migrate
    from marketplace.infra.db import Base

    pg = Postgres()
    try:
        migrate.upgrade(pg.url)
        engine = create_engine(pg.url)
        try:
            with engine.connect() as conn:
                diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        finally:
            engine.dispose()
    finally:
        pg.drop()
    assert diff == [], f"models and migrations differ (add a migration): {diff}"

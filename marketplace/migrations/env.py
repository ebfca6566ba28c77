"""Alembic environment: the URL comes from the caller (marketplace.migrate) or settings."""
from alembic import context
from sqlalchemy import engine_from_config, pool

import marketplace.models  # noqa: F401  (fills the metadata)
from marketplace.infra.db import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    from marketplace.settings import get_settings, psycopg2_url

    return psycopg2_url(config.get_main_option("sqlalchemy.url") or get_settings().database_url)


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = engine_from_config(
        {"sqlalchemy.url": _url()}, prefix="sqlalchemy.", poolclass=pool.NullPool
    )
    with connectable.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

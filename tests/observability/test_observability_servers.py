"""The real servers: Flower behind basic auth, and `marketplace api` (gunicorn, 2 workers) in multiprocess mode."""
from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.support.servers import ROOT, VENV_BIN, free_port, wait_port


def _get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def test_flower_refuses_anonymous_api_calls_and_serves_metrics(stack):  # type: ignore[no-untyped-def]
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="mp-flower-")) / "flower.log"
    proc = subprocess.Popen(
        [str(VENV_BIN / "celery"), "-A", "marketplace", "flower", "--address=127.0.0.1", f"--port={port}",
         "--basic-auth=ops:flower-test-pw"],
        cwd=ROOT, env=dict(os.environ), stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_port(port, timeout=60)
        assert _get(f"http://127.0.0.1:{port}/api/workers")[0] == 401
        assert _get(f"http://127.0.0.1:{port}/api/workers", auth=("ops", "wrong"))[0] == 401
        status, _ = _get(f"http://127.0.0.1:{port}/api/workers", auth=("ops", "flower-test-pw"))
        assert status == 200
        status, text = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and "flower_events_total" in text
    finally:
        _stop(proc)


def test_marketplace_api_aggregates_gunicorn_workers_and_logs_json(stack, obs_worker):  # type: ignore[no-untyped-def]
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="mp-api-")) / "api.log"
    metrics_dir = Path(tempfile.mkdtemp(prefix="mp-api-metrics-"))
    (metrics_dir / "counter_1.db").write_bytes(b"stale")  # a previous run's file: must be cleared
    env = {**os.environ, "MARKETPLACE_LOG_JSON": "true", "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    proc = subprocess.Popen(
        [str(VENV_BIN / "marketplace"), "api", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
         "--threads", "2"],
        cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_port(port, timeout=60)
        n = 40
        for _ in range(n):
            assert _get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        assert not (metrics_dir / "counter_1.db").exists()
        assert list(metrics_dir.glob("counter_*.db"))  # multiprocess mode: counts live in per-pid files
        for _ in range(4):  # whichever worker answers the scrape, it reports every worker's requests
            status, text = _get(f"http://127.0.0.1:{port}/metrics")
            assert status == 200
            total = sum(
                s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                if s.name == "flask_http_request_duration_seconds_count" and s.labels.get("endpoint") == "health.healthz"
            )
            assert total == n, text
        assert "marketplace_workers_live" in text and "marketplace_queue_depth" in text
    finally:
        _stop(proc)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # gunicorn's own and access lines included
    assert any(r["logger"] == "gunicorn.access" and "/healthz" in r["message"] for r in records)
    assert any(r["logger"] == "gunicorn.error" for r in records)

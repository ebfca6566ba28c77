"""API: submissions/s and p50/p99 latency under 16 concurrent clients vs an authenticated no-op
JSON endpoint served by the same gunicorn configuration (`marketplace api`: gthread 2×4).

    .venv/bin/python bench/api_load.py [--clients 16] [--requests 1600]
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time

import requests
from harness import ROOT, stack  # noqa: I001 - harness puts the repo on sys.path

from tests.support.servers import free_port, wait_port

GUNICORN = [os.path.join(os.path.dirname(sys.executable), "gunicorn"), "--workers", "2", "--threads", "4",
            "--worker-class", "gthread", "--no-control-socket", "--config", "python:api.gunicorn_conf"]


def serve(app: str, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'bench'}", "MARKETPLACE_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([*GUNICORN, "--bind", f"127.0.0.1:{port}", app], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_port(port, timeout=30)
    return proc


def load(url: str, method: str, tokens: list[str], body: dict | None, clients: int, total: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    lock = threading.Lock()
    per_client = total // clients

    def run(token: str) -> None:
        s = requests.Session()
        s.headers["Authorization"] = f"Bearer {token}"
        mine = []
        for _ in range(per_client):
            t = time.perf_counter()
            r = s.request(method, url, json=body, timeout=30)
            mine.append(time.perf_counter() - t)
            assert r.status_code in (200, 202), (r.status_code, r.text[:200])
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=run, args=(tokens[i % len(tokens)],)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(latencies) / (time.perf_counter() - start), sorted(latencies)


def account(base: str, i: int) -> str:
    email, password = f"bench-{i}-{time.time_ns()}@example.com", "correct horse battery"
    requests.post(f"{base}/v1/auth/register", json={"email": email, "password": password}, timeout=30)
    return requests.post(f"{base}/v1/auth/login", json={"email": email, "password": password},
                         timeout=30).json()["access_token"]


def _combine(rounds: list[tuple[float, list[float]]]) -> tuple[float, list[float]]:
    """Requests per second over all rounds (total requests / total time) and all latencies, sorted."""
    requests = sum(len(lat) for _, lat in rounds)
    seconds = sum(len(lat) / rps for rps, lat in rounds)
    return requests / seconds, sorted(x for _, lat in rounds for x in lat)


def pct(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(len(values) * p))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=1600)
    parser.add_argument("--rounds", type=int, default=4, help="alternations of the two sides")
    args = parser.parse_args()
    with stack():
        port = free_port()
        server = serve("api_noop:app", port)
        try:
            base = f"http://127.0.0.1:{port}"
            # One account per client, as 16 customers would be (one account's submits serialize on
            # its balance row by design).
            tokens = [account(base, i) for i in range(args.clients)]
            body = {"model": "echo", "inputs": [1, 2, 3]}
            load(f"{base}/v1/bench/noop", "GET", tokens, None, args.clients, args.clients * 10)  # warm up
            load(f"{base}/v1/tasks", "POST", tokens, body, args.clients, args.clients * 5)
            # Interleaved in rounds (no-op, submit, no-op, ...): this machine's speed drifts within
            # minutes, and one block after the other would measure the drift.
            sides: dict[str, list[tuple[float, list[float]]]] = {"noop": [], "submit": []}
            per_round = args.requests // args.rounds
            for _ in range(args.rounds):
                sides["noop"].append(load(f"{base}/v1/bench/noop", "GET", tokens, None, args.clients, per_round))
                sides["submit"].append(load(f"{base}/v1/tasks", "POST", tokens, body, args.clients, per_round))
            noop_rps, noop_lat = _combine(sides["noop"])
            sub_rps, sub_lat = _combine(sides["submit"])
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    print(f"{args.clients} clients (one account each), {args.requests} requests each side in {args.rounds} "
          "interleaved rounds, gunicorn gthread 2x4, client on the same 2 cores")
    print(f"  no-op (authenticated): {noop_rps:7.0f} req/s  p50 {pct(noop_lat, .5):6.1f} ms  p99 {pct(noop_lat, .99):6.1f} ms")
    print(f"  POST /v1/tasks:        {sub_rps:7.0f} req/s  p50 {pct(sub_lat, .5):6.1f} ms  p99 {pct(sub_lat, .99):6.1f} ms")
    print(f"  ratio submissions/no-op: {sub_rps / noop_rps:.2f} (target >= 0.5)")


if __name__ == "__main__":
    main()

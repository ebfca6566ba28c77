"""Live progress under load: POST /v1/tasks throughput with 200 open event streams
(`GET /v1/tasks/<id>/events`) vs without them, same run, `marketplace api` as shipped (gunicorn
gthread, 2 workers, 4 request threads each plus a thread per stream it may hold).

    .venv/bin/python bench/event_streams.py [--streams 200] [--clients 16] [--requests 800]

Everything on 127.0.0.1; the streams are raw sockets drained by one thread (their keep-alives),
so holding them costs this process next to nothing. No compute node runs: the submitted tasks
stay Created, their TaskCreated rows are what the API's outbox readers go through.
"""
from __future__ import annotations

import argparse
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time

import requests
from api_load import _combine, account, load, pct
from harness import ROOT, stack  # noqa: I001 - harness puts the repo on sys.path

from tests.support.servers import free_port, wait_port


class Streams:
    """`count` open event streams on `port`, each on a task of `token`'s, read and discarded."""

    def __init__(self, port: int, token: str, task_ids: list[str]) -> None:
        self.selector = selectors.DefaultSelector()
        self.socks: list[socket.socket] = []
        self.bytes = 0
        self.refused = 0
        for task_id in task_ids:
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(f"GET /v1/tasks/{task_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n".encode())
            head = s.recv(65536)
            if not head.startswith(b"HTTP/1.1 200"):
                self.refused += 1
                if os.environ.get("BENCH_DEBUG"):
                    print(head[:600])
            self.socks.append(s)
            s.setblocking(False)
            self.selector.register(s, selectors.EVENT_READ)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        while not self._stop.is_set():
            for key, _ in self.selector.select(timeout=0.5):
                try:
                    self.bytes += len(key.fileobj.recv(65536))  # type: ignore[union-attr]
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self.thread.join()
        for s in self.socks:
            self.selector.unregister(s)
            s.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=800, help="submissions per side per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two sides")
    args = parser.parse_args()
    with stack():
        port = free_port()
        marketplace = os.path.join(os.path.dirname(sys.executable), "marketplace")
        server = subprocess.Popen([marketplace, "api", "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_port(port, timeout=60)
            base = f"http://127.0.0.1:{port}"
            tokens = [account(base, i) for i in range(args.clients)]
            watcher = account(base, 10_000)
            body = {"model": "echo", "inputs": [1, 2, 3]}
            watched = [requests.post(f"{base}/v1/tasks", json=body, headers={"Authorization": f"Bearer {watcher}"},
                                     timeout=30).json()["id"] for _ in range(args.streams)]
            load(f"{base}/v1/tasks", "POST", tokens, body, args.clients, args.clients * 5)  # warm up
            sides: dict[str, list[tuple[float, list[float]]]] = {"without": [], "with": []}
            refused, streamed = 0, 0
            started = time.monotonic()
            for _ in range(args.rounds):
                sides["without"].append(load(f"{base}/v1/tasks", "POST", tokens, body, args.clients, args.requests))
                streams = Streams(port, watcher, watched)
                try:
                    refused = max(refused, streams.refused)
                    sides["with"].append(load(f"{base}/v1/tasks", "POST", tokens, body, args.clients, args.requests))
                    streamed += streams.bytes
                finally:
                    streams.close()
            elapsed = time.monotonic() - started
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
    without_rps, without_lat = _combine(sides["without"])
    with_rps, with_lat = _combine(sides["with"])
    print(f"POST /v1/tasks, {args.clients} clients, {args.requests} submissions per side per round, "
          f"{args.rounds} interleaved rounds ({elapsed:.0f} s); `marketplace api` defaults (gthread, 2 workers); "
          "client on the same cores")
    print(f"  without streams:          {without_rps:7.0f} req/s  p50 {pct(without_lat, .5):6.1f} ms  "
          f"p99 {pct(without_lat, .99):6.1f} ms")
    print(f"  with {args.streams} open streams:    {with_rps:7.0f} req/s  p50 {pct(with_lat, .5):6.1f} ms  "
          f"p99 {pct(with_lat, .99):6.1f} ms   ({refused} refused, {streamed} bytes streamed)")
    print(f"  ratio with/without: {with_rps / without_rps:.2f} (target >= 0.9)")


if __name__ == "__main__":
    main()

"""Fixtures for the observability tests: a worker node with its exporter, an OTLP receiver, span capture."""
from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.support.api import api_app
from tests.support.env import private_broker
from tests.support.servers import CeleryWorker, RedisServer, free_port

OBS_QUEUES = ["marketplace.scheduler", "marketplace.results", "marketplace.maintenance", "cpu.generic"]


class OtlpReceiver:
    """A tiny OTLP/HTTP trace receiver: collects the spans POSTed to /v1/traces."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                with receiver.lock:
                    for rs in request.resource_spans:
                        service = next((a.value.string_value for a in rs.resource.attributes
                                        if a.key == "service.name"), None)
                        for ss in rs.scope_spans:
                            for span in ss.spans:
                                receiver.spans.append({
                                    "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                                    "parent_span_id": span.parent_span_id.hex(), "name": span.name,
                                    "service": service, "scope": ss.scope.name,
                                    "attributes": {a.key: a.value for a in span.attributes},
                                })
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spans_of(self, trace_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="session")
def otlp_receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    yield receiver
    receiver.stop()


class ObservedWorker:
    def __init__(self, node: CeleryWorker, metrics_port: int) -> None:
        self.node = node
        self.metrics_port = metrics_port

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as resp:
            return resp.read().decode()

    def log_lines(self) -> list[str]:
        """The complete lines written so far (a line the node is still writing is left out)."""
        text = self.node.log.read_text(errors="replace")
        return [line for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]

    def log_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_lines()]


@pytest.fixture(scope="module")
def obs_broker(stack: dict[str, str]) -> Iterator[RedisServer]:
    """A broker of this module's own: no other test's worker can take (and count) these jobs."""
    with private_broker() as server:
        yield server


@pytest.fixture(scope="module")
def redis_client(obs_broker: RedisServer):  # type: ignore[no-untyped-def]
    from marketplace.infra.redis_client import get_redis

    return get_redis()


@pytest.fixture()
def app(obs_broker: RedisServer):  # type: ignore[no-untyped-def]
    return api_app()


@pytest.fixture(scope="module")
def obs_worker(stack: dict[str, str], redis_client, otlp_receiver: OtlpReceiver) -> Iterator[ObservedWorker]:  # type: ignore[no-untyped-def]
    """The only worker on this module's broker: control queues + cpu.generic, exporter on a free port,
    JSON logs, spans to the local OTLP receiver."""
    port = free_port()
    node = CeleryWorker(OBS_QUEUES, name="obs", concurrency=2, env={
        "MARKETPLACE_METRICS_PORT": str(port),
        "MARKETPLACE_METRICS_HOST": "127.0.0.1",
        "MARKETPLACE_LOG_JSON": "true",
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.url,
        "OTEL_SERVICE_NAME": "marketplace-worker-test",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    })
    try:
        node.wait_ready(redis_client, timeout=90)
        yield ObservedWorker(node, port)
    finally:
        node.stop()


@pytest.fixture(scope="session")
def memory_spans(stack: dict[str, str]):  # type: ignore[no-untyped-def]
    """Spans finished in this (the API's) process, kept in memory."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from marketplace.observability import tracing

    provider = tracing.init_tracing("marketplace-api-test")
    assert provider is not None, "tracing is disabled in this environment (OTEL_SDK_DISABLED?)"
    exporter = InMemorySpanExporter()
    tracing.export_spans(SimpleSpanProcessor(exporter))
    return exporter

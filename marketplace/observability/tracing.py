"""OpenTelemetry tracing: one trace per job, REST request -> scheduler -> subtasks -> chord callback.

Every process installs an SDK tracer provider, so trace and span ids exist (in
logs, in `GET /v1/tasks/<id>`'s `trace_id`) and travel in Celery message
headers (W3C traceparent, injected by the Celery instrumentation) even when
nothing is exported. Spans leave the process only when
`OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set: OTLP over
HTTP/protobuf. Until something exports them, spans are not recorded (see
`_ExportedOnly`). The other standard `OTEL_*` variables (sampler, batch delays,
resource attributes) are read by the SDK itself. `OTEL_SDK_DISABLED=true`
turns all of it off.
"""
from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger(__name__)
EXCLUDED_URLS = "metrics,healthz,readyz"

_provider: Any = None
_pid: int | None = None
_stub_tasks: dict[str, Any] = {}
_sampler: Any = None


def _exported_only() -> Any:
    from opentelemetry.sdk.trace import sampling

    class _ExportedOnly(sampling.Sampler):
        """Record spans only once something exports them (`export_spans`).

        Until then each span is a non-recording one: it still has its trace and span ids, which
        reach the logs, `trace_id` and the Celery message headers, but nothing builds
        attributes, events and timings for nobody (the Celery instrumentation's spans were ~7%
        of a fan-out's worker CPU). Recording, every span is kept, not only those whose caller
        sampled them: a worker that exports keeps its spans when the API exports nothing.
        `OTEL_TRACES_SAMPLER`, when set, replaces all of this.
        """

        def __init__(self) -> None:
            self.recording = False

        def should_sample(self, *args: Any, **kwargs: Any) -> Any:
            return (sampling.ALWAYS_ON if self.recording else sampling.ALWAYS_OFF).should_sample(*args, **kwargs)

        def get_description(self) -> str:
            return f"ExportedOnly{{{'on' if self.recording else 'off'}}}"

    return _ExportedOnly()


def get_tracer_provider() -> Any:
    """This process's SDK TracerProvider (None before `init_tracing` or when disabled)."""
    return _provider


def init_tracing(service_name: str | None = None) -> Any:
    """Install the tracer provider and the library instrumentations once per process tree."""
    global _provider, _pid, _sampler
    from marketplace.settings import get_settings

    settings = get_settings()
    if settings.otel_sdk_disabled:
        return None
    if _provider is not None:
        return _provider
    from opentelemetry import trace
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {} if settings.otel_service_name else {SERVICE_NAME: service_name or "marketplace"}
    _sampler = None if os.environ.get("OTEL_TRACES_SAMPLER") else _exported_only()
    provider = TracerProvider(resource=Resource.create(attributes), sampler=_sampler)
    endpoint = settings.otel_exporter_otlp_traces_endpoint or (
        settings.otel_exporter_otlp_endpoint.rstrip("/") + "/v1/traces" if settings.otel_exporter_otlp_endpoint else None
    )
    trace.set_tracer_provider(provider)
    _provider, _pid = provider, os.getpid()
    if endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        export_spans(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    _instrument_libraries(provider, detailed=bool(endpoint))
    logger.debug("tracing: provider installed (export to %s)", endpoint or "nowhere")
    return provider


def export_spans(processor: Any) -> None:
    """Hand this process's spans to `processor` (a span processor with its exporter): from
    now on spans are recorded. Call after `init_tracing`."""
    assert _provider is not None, "tracing is not initialised (or OTEL_SDK_DISABLED)"
    _provider.add_span_processor(processor)
    if _sampler is not None:
        _sampler.recording = True


def _instrument_libraries(provider: Any, *, detailed: bool) -> None:
    """Celery always (it carries the trace id across processes, for logs and `trace_id`);
    per-call spans of SQL, Redis, S3 and gRPC only when they are exported: built and
    dropped they cost ~10% of a small subtask's CPU and show nobody anything."""
    from opentelemetry.instrumentation.botocore import BotocoreInstrumentor
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    _patch_celery_publish()
    instrumentors = [CeleryInstrumentor()] + ([RedisInstrumentor(), BotocoreInstrumentor()] if detailed else [])
    for instrumentor in instrumentors:
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument(tracer_provider=provider)
    if not detailed:
        return
    _trace_sqlalchemy(provider)
    try:
        from opentelemetry.instrumentation.grpc import GrpcInstrumentorClient, GrpcInstrumentorServer
    except ImportError:  # grpc is an optional part of a node
        return
    for grpc_instrumentor in (GrpcInstrumentorServer(), GrpcInstrumentorClient()):
        if not grpc_instrumentor.is_instrumented_by_opentelemetry:
            grpc_instrumentor.instrument(tracer_provider=provider)


def _trace_sqlalchemy(provider: Any) -> None:
    """Trace the engines `marketplace.db` builds (each process builds its own after fork).

    `SQLAlchemyInstrumentor().instrument()` is not used: its declared range ends
    below SQLAlchemy 2.1 and it imports sqlalchemy.ext.asyncio (greenlet).
    The engine events its `EngineTracer` listens to are unchanged in 2.1.
    """
    import sqlalchemy
    from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
    from opentelemetry.metrics import get_meter

    from marketplace.infra import db

    if getattr(db.create_engine, "_marketplace", False):
        return
    scope = "opentelemetry.instrumentation.sqlalchemy"
    tracer = provider.get_tracer(scope)
    usage = get_meter(scope).create_up_down_counter(
        name="db.client.connections.usage", unit="connections", description="Connections by state."
    )

    def create_engine(*args: Any, **kwargs: Any) -> Any:
        engine = sqlalchemy.create_engine(*args, **kwargs)
        EngineTracer(tracer, engine, usage)
        return engine

    create_engine._marketplace = True  # type: ignore[attr-defined]
    db.create_engine = create_engine  # type: ignore[attr-defined]
    if db._engine is not None:  # built before tracing started (e.g. by an earlier import-time user)
        EngineTracer(tracer, db._engine, usage)


class _PublishedTask:
    """Stands in for a task this process publishes by name but does not register (`send_task`)."""

    def __init__(self, name: str) -> None:
        self.name = name


def _patch_celery_publish() -> None:
    """Let the Celery instrumentation finish the publish span of a task sent by name.

    It looks the sender up in this process's task registry; the API publishes
    `marketplace.scheduling.schedule` with `send_task` and has no such task, so
    the span would stay open and its context attached to the request thread.
    """
    from opentelemetry.instrumentation.celery import utils

    if getattr(utils.retrieve_task_from_sender, "_marketplace", False):
        return
    original = utils.retrieve_task_from_sender

    def retrieve(kwargs: Any) -> Any:
        task = original(kwargs)
        sender = kwargs.get("sender")
        if task is None and isinstance(sender, str):
            task = _stub_tasks.setdefault(sender, _PublishedTask(sender))
        return task

    retrieve._marketplace = True  # type: ignore[attr-defined]
    utils.retrieve_task_from_sender = retrieve


def instrument_flask(app: Any) -> None:
    if _provider is None:
        return
    from opentelemetry.instrumentation.flask import FlaskInstrumentor

    FlaskInstrumentor().instrument_app(app, tracer_provider=_provider, excluded_urls=EXCLUDED_URLS)


def flush(timeout_ms: int = 5000) -> None:
    """Export what is buffered (a pool child may exit without running atexit handlers)."""
    if _provider is not None:
        try:
            _provider.force_flush(timeout_ms)
        except Exception as exc:
            logger.warning("tracing: flush failed: %s", exc)


@contextmanager
def job_trace(trace_id: str | None, name: str) -> Iterator[None]:
    """Run a block inside the job's own trace when it runs on another one's behalf.

    A waiting task woken by a new node, or a stalled one re-dispatched by recovery,
    is published from that node's or sweep's trace; without this its subtasks and
    callback would land there, not under the trace id `GET /v1/tasks/<id>` shows.
    The block gets a span in the job's trace (its parent is a stand-in: only the
    trace id is stored), linked to the span that asked for it.
    """
    from opentelemetry import trace

    current = trace.get_current_span().get_span_context()
    try:
        wanted = int(trace_id or "", 16)
    except ValueError:
        wanted = 0
    if _provider is None or not wanted or current.trace_id == wanted:
        yield
        return
    parent = trace.NonRecordingSpan(trace.SpanContext(
        trace_id=wanted, span_id=random.getrandbits(64) or 1, is_remote=True,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
    ))
    links = [trace.Link(current)] if current.is_valid else []
    tracer = _provider.get_tracer(__name__)
    with tracer.start_as_current_span(name, context=trace.set_span_in_context(parent), links=links):
        yield


def current_trace_id() -> str | None:
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


@contextmanager
def publish_scope(task_name: str, message_id: str) -> Iterator[None]:
    """Around a publish whose failure the caller handles (it leaves the message to recovery).

    The Celery instrumentation opens its publish span, and makes it the current span, in
    `before_task_publish`, and closes it in `after_task_publish`, which a failed publish never
    sends: the span stayed current in the thread, unended (and held by the instrumentation),
    and what was traced after it in that thread joined its trace, or, unsampled, was not
    recorded. This closes that span with the error and restores the context the publish
    started from."""
    from opentelemetry import context

    token = context.attach(context.get_current())
    try:
        yield
    except Exception as exc:
        if _provider is not None:
            from opentelemetry.instrumentation.celery import utils

            task = utils.retrieve_task_from_sender({"sender": task_name})
            opened = utils.retrieve_context(task, message_id, is_publish=True)
            if opened is not None:
                utils.detach_context(task, message_id, is_publish=True)
                opened[1].__exit__(type(exc), exc, exc.__traceback__)  # records it, ends the span
        raise
    finally:
        context.detach(token)

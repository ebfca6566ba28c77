"""One trace per job across the API and the worker processes; JSON log lines that carry the ids."""
from __future__ import annotations

import io
import json
import logging
import uuid

import pytest

from tests.support.api import register, wait_for_task
from tests.support.wait import wait_until


@pytest.fixture()
def user(client, obs_worker):  # type: ignore[no-untyped-def]
    return register(client)


def test_a_job_is_one_trace_from_the_request_to_its_finish(client, user, obs_worker, otlp_receiver,  # type: ignore[no-untyped-def]
                                                          memory_spans):
    from opentelemetry.trace import SpanKind

    from workers.runner import INLINE_FINALIZE_SPAN

    memory_spans.clear()
    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": list(range(6)), "batch_size": 2},
                       headers=user["headers"])
    assert resp.status_code == 202
    task_id = resp.get_json()["id"]
    doc = wait_for_task(client, user["headers"], task_id, timeout=90)
    assert doc["status"] == "Done"
    trace_id = doc["trace_id"]
    assert trace_id and len(trace_id) == 32 and trace_id != "0" * 32

    # The API process: the request span and the publish of the scheduling step.
    api_spans = [s for s in memory_spans.get_finished_spans() if format(s.context.trace_id, "032x") == trace_id]
    request_span = next(s for s in api_spans if s.kind == SpanKind.SERVER)
    assert request_span.name == "POST /v1/tasks" and request_span.parent is None
    assert any(s.name == "apply_async/marketplace.scheduling.schedule" for s in api_spans)
    # No OTLP endpoint in this process: per-call SQL/Redis spans are not built here (see tracing.py);
    # the worker below exports, and there they must be present.
    assert not any(s.attributes.get("db.system") for s in api_spans), [s.name for s in api_spans]

    # The worker process (pool children), exported over OTLP/HTTP: same trace id.
    def worker_spans():  # type: ignore[no-untyped-def]
        spans = otlp_receiver.spans_of(trace_id)
        names = [s["name"] for s in spans]
        # The job ends in its last subtask (inline) or, when that could not, in a finalize message.
        if ("run/marketplace.scheduling.schedule" in names and names.count("run/workers.run_subtask") >= 3
                and ({INLINE_FINALIZE_SPAN, "run/marketplace.results.finalize"} & set(names))):
            return spans
        return None

    def seen() -> str:
        names = sorted(s["name"] for s in otlp_receiver.spans_of(trace_id) if "/" in s["name"])
        problems = [line for line in obs_worker.log_lines() if any(f'"{level}"' in line for level in ("warning", "error"))]
        return f"the worker's spans; seen {names}; worker warnings: {problems[-20:]}"

    spans = wait_until(worker_spans, timeout=30, what=seen)
    assert {s["service"] for s in spans} == {"marketplace-worker-test"}
    scopes = {s["scope"] for s in spans}
    assert "opentelemetry.instrumentation.sqlalchemy" in scopes, scopes
    assert "opentelemetry.instrumentation.botocore" in scopes, scopes  # parts written to S3
    assert "opentelemetry.instrumentation.redis" in scopes, scopes
    # Subtasks hang under a release's publish: the scheduler run's first one, or, as slots free up,
    # one made by a subtask of the same job when it finished (the fair dispatcher's next release).
    by_id = {s["span_id"]: s for s in spans}
    schedule_run = next(s for s in spans if s["name"] == "run/marketplace.scheduling.schedule")
    api_publish = next(s for s in api_spans if s.name == "apply_async/marketplace.scheduling.schedule")
    assert schedule_run["parent_span_id"] == format(api_publish.context.span_id, "016x")
    for run in (s for s in spans if s["name"] == "run/workers.run_subtask"):
        parent = by_id[run["parent_span_id"]]
        assert parent["name"] == "apply_async/workers.run_subtask"
        releaser = by_id[parent["parent_span_id"]]
        assert releaser["span_id"] == schedule_run["span_id"] or releaser["name"] == "run/workers.run_subtask"
    for inline in (s for s in spans if s["name"] == INLINE_FINALIZE_SPAN):  # inside the subtask that ran it
        assert by_id[inline["parent_span_id"]]["name"] == "run/workers.run_subtask"


def test_a_waiting_task_woken_by_a_new_node_stays_in_its_own_trace(client, user, redis_client, memory_spans):  # type: ignore[no-untyped-def]
    """`wake` runs in the node's trace; the chord it publishes belongs to the job's."""
    from opentelemetry import trace

    from marketplace.infra.db import session_scope
    from marketplace.registry.service import deregister, heartbeat
    from marketplace.scheduling.service import schedule_task
    from marketplace.scheduling.tasks import wake
    from marketplace.tasks.schemas import TaskRequest
    from marketplace.tasks.service import create_task

    job_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    file_id = client.post("/v1/files", data={"file": (io.BytesIO(b"pixels"), "x.png")}, headers=user["headers"],
                          content_type="multipart/form-data").get_json()["id"]
    with session_scope() as session:  # no `schedule` message: nothing else schedules it meanwhile
        task, _ = create_task(session, user_id=uuid.UUID(user["id"]), trace_id=job_trace,
                              request=TaskRequest(model="resnet50", inputs=[{"file": file_id}], device="gpu"))
        task_id = str(task.id)
    assert schedule_task(task_id).status == "waiting"
    node = f"fake-{uuid.uuid4().hex[:8]}@test"
    heartbeat(redis_client, info={"hostname": node, "queues": ["gpu.resnet50"], "models": ["resnet50"],
                                  "concurrency": 1, "unavailable": {}})
    memory_spans.clear()
    try:
        with trace.get_tracer(__name__).start_as_current_span("node online") as node_span:
            assert wake.run(["gpu.resnet50"], ["resnet50"])["scheduled"] == [task_id]
    finally:
        deregister(redis_client, hostname=node)
        client.post(f"/v1/tasks/{task_id}/cancel", headers=user["headers"])
        for key in redis_client.scan_iter(match="gpu.resnet50*"):
            redis_client.delete(key)
    published = [s for s in memory_spans.get_finished_spans() if s.name == "apply_async/workers.run_subtask"]
    assert published and all(format(s.context.trace_id, "032x") == job_trace for s in published)
    dispatch_span = next(s for s in memory_spans.get_finished_spans() if s.name == "dispatch")
    assert format(dispatch_span.context.trace_id, "032x") == job_trace
    assert [link.context.span_id for link in dispatch_span.links] == [node_span.get_span_context().span_id]


def test_a_task_rescheduled_by_recovery_runs_in_its_own_trace(client, user, obs_worker, otlp_receiver,  # type: ignore[no-untyped-def]
                                                               memory_spans, monkeypatch):
    """Recovery's sweep re-publishes a lost scheduling message from its own trace; the job
    (scheduler, subtasks, callback on the worker) still lands in the job's."""
    from datetime import timedelta

    from opentelemetry import trace
    from sqlalchemy import update

    from marketplace.infra.db import session_scope, utcnow
    from marketplace.scheduling.recovery import recover_stalled
    from marketplace.settings import get_settings
    from marketplace.tasks.models import Task
    from marketplace.tasks.schemas import TaskRequest
    from marketplace.tasks.service import create_task

    job_trace = uuid.uuid4().hex
    with session_scope() as session:  # stored, its scheduling message "lost" (never published), long ago
        task, _ = create_task(session, user_id=uuid.UUID(user["id"]), trace_id=job_trace,
                              request=TaskRequest(model="echo", inputs=[1, 2], batch_size=1))
        task_id = str(task.id)
        session.execute(update(Task).where(Task.id == task.id).values(progress_at=utcnow() - timedelta(days=10)))
    monkeypatch.setattr(get_settings(), "recovery_stall_seconds", 9 * 86400.0)  # only this task is that old
    memory_spans.clear()
    with trace.get_tracer(__name__).start_as_current_span("recovery sweep"):
        assert recover_stalled()["rescheduled"] == [task_id]
    published = [s for s in memory_spans.get_finished_spans() if s.name == "apply_async/marketplace.scheduling.schedule"]
    assert [format(s.context.trace_id, "032x") for s in published] == [job_trace]
    assert wait_for_task(client, user["headers"], task_id, timeout=90)["status"] == "Done"

    def worker_spans():  # type: ignore[no-untyped-def]
        names = [s["name"] for s in otlp_receiver.spans_of(job_trace)]
        return names if names.count("run/workers.run_subtask") >= 2 and "run/marketplace.scheduling.schedule" in names \
            else None

    wait_until(worker_spans, timeout=30, what=lambda: f"{sorted(s['name'] for s in otlp_receiver.spans_of(job_trace))}")


def test_worker_log_lines_are_json_and_carry_our_ids(client, user, obs_worker):  # type: ignore[no-untyped-def]
    resp = client.post("/v1/tasks", json={"model": "echo", "inputs": ["ok", "bad"], "batch_size": 1,
                                          "params": {"fail_items": ["bad"]}}, headers=user["headers"])
    task_id = resp.get_json()["id"]
    doc = wait_for_task(client, user["headers"], task_id, timeout=90)
    assert doc["status"] == "Failed"
    subtasks = client.get(f"/v1/tasks/{task_id}/subtasks", headers=user["headers"]).get_json()["subtasks"]
    failed_subtask = next(s["id"] for s in subtasks if s["status"] == "Failed")

    def failure_logged():  # type: ignore[no-untyped-def]
        # The failing subtask's own line (it fails its task), written before the task is Failed.
        lines = obs_worker.log_lines()
        return lines if any(task_id in line and '"workers.runner"' in line and "failed:" in line
                            for line in lines) else None

    lines = wait_until(failure_logged, timeout=30)
    records = []
    for line in lines:  # every line on the worker's stdout/stderr is one JSON object
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON log line: {line!r}")
    for rec in records:
        assert {"ts", "level", "logger", "message"} <= set(rec), rec

    ours = [r for r in records if r.get("task_id") == task_id]
    retry_lines = [r for r in ours if r["level"] == "warning" and "will retry" in r["message"]]
    assert retry_lines, [r["message"] for r in ours]
    for rec in retry_lines:
        assert rec["subtask_id"] == failed_subtask
        assert rec["user_id"] == user["id"]
        assert rec["trace_id"] == doc["trace_id"] and len(rec["span_id"]) == 16
    failed = [r for r in ours if r["logger"] == "workers.runner" and r["level"] == "error"]
    assert failed and all(r["trace_id"] == doc["trace_id"] and r["subtask_id"] == failed_subtask for r in failed)
    schedule = [r for r in ours if r["logger"] == "marketplace.scheduling.tasks"]
    assert schedule and schedule[0]["user_id"] == user["id"]
    # Celery's line per run ("received", "succeeded in") is DEBUG for subtasks (a fan-out of 1,000 wrote
    # 2,000 of them) and stays INFO for the other tasks.
    per_run = [r["message"] for r in records if r["logger"] in ("celery.app.trace", "celery.worker.strategy")]
    assert not [m for m in per_run if "workers.run_subtask" in m and ("received" in m or "succeeded" in m)], per_run
    assert any("marketplace.scheduling.schedule" in m and "succeeded" in m for m in per_run), per_run
    # The node announced itself as a JSON line instead of Celery's ASCII banner.
    assert any(r["logger"] == "marketplace.observability.celery" and "queues" in r for r in records)


def test_api_log_lines_carry_the_request_ids_and_scrub_secrets(app, client, memory_spans):  # type: ignore[no-untyped-def]
    from flask_jwt_extended import verify_jwt_in_request
    from pydantic import SecretStr

    from marketplace.observability.logs import JsonFormatter

    u = register(client)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("tests.observability.api")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    token = u["tokens"]["access_token"]
    try:
        with app.test_request_context("/v1/me", headers=u["headers"]):
            verify_jwt_in_request()
            from opentelemetry import trace

            with trace.get_tracer("tests").start_as_current_span("request") as span:
                log.info("login for %s with password=%s", u["email"], u["password"])
                log.info("headers: Authorization: Bearer %s", token)
                log.info("secret %s token %s", SecretStr("hunter2-secret"), token, extra={"api_key": "k-123"})
                log.warning("broker redis://:s3cr3t-pass@redis:6379/0 down")
    finally:
        log.removeHandler(handler)
    out = stream.getvalue()
    for secret in (u["password"], token, "hunter2-secret", "k-123", "s3cr3t-pass"):
        assert secret not in out
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 4
    for rec in records:
        assert rec["user_id"] == u["id"]
        assert rec["trace_id"] == format(span.get_span_context().trace_id, "032x")
        assert rec["span_id"] == format(span.get_span_context().span_id, "016x")
        assert rec["logger"] == "tests.observability.api"
    assert records[0]["message"].startswith(f"login for {u['email']} with password=***")
    assert records[2]["api_key"] == "***"
    assert records[3]["level"] == "warning" and "redis://:***@redis:6379/0" in records[3]["message"]


def test_spans_carry_ids_but_are_recorded_only_once_something_exports_them():  # type: ignore[no-untyped-def]
    from opentelemetry import trace
    from opentelemetry.propagate import inject
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from marketplace.observability import tracing

    sampler = tracing._exported_only()
    provider = TracerProvider(sampler=sampler)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer(__name__)
    with tracer.start_as_current_span("request") as span:
        ctx = span.get_span_context()
        assert ctx.is_valid and not span.is_recording()
        headers: dict[str, str] = {}
        inject(headers)  # what a Celery message carries
        assert headers["traceparent"].split("-")[1] == format(ctx.trace_id, "032x")
        with tracer.start_as_current_span("publish") as child:
            assert child.get_span_context().trace_id == ctx.trace_id
    assert exporter.get_finished_spans() == ()
    # Exporting: recorded, even under a caller that sampled nothing (an API exporting nothing).
    sampler.recording = True
    with tracer.start_as_current_span("run", context=trace.set_span_in_context(trace.NonRecordingSpan(ctx))) as span:
        assert span.is_recording()
    (finished,) = exporter.get_finished_spans()
    assert finished.name == "run" and finished.context.trace_id == ctx.trace_id


def test_a_failed_publish_leaves_no_span_current_behind(memory_spans):  # type: ignore[no-untyped-def]
    """The Celery instrumentation makes its publish span current before the publish and ends it
    after; a publish that fails never ends it, and the thread's later spans joined that trace.
    `publish_scope`, around the publishes whose failure is left to recovery, ends it and
    restores the context."""
    from opentelemetry import trace
    from opentelemetry.trace import StatusCode

    from marketplace.infra.celery_app import app
    from marketplace.observability.tracing import publish_scope
    from tests.support.env import private_broker

    tracer = trace.get_tracer("test")
    with private_broker() as broker, tracer.start_as_current_span("caller") as caller:
        broker.stop()  # type: ignore[attr-defined]
        with pytest.raises(Exception) as failed, publish_scope("marketplace.test.nothing", "m-1"):
            app.send_task("marketplace.test.nothing", queue="marketplace.maintenance", ignore_result=True,
                          task_id="m-1")
        assert trace.get_current_span() is caller, failed.value
    spans = [s for s in memory_spans.get_finished_spans() if s.name == "apply_async/marketplace.test.nothing"]
    assert len(spans) == 1 and spans[0].status.status_code == StatusCode.ERROR, spans
    assert spans[0].parent is not None and spans[0].parent.span_id == caller.get_span_context().span_id

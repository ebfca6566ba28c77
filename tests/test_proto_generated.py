"""The generated gRPC code in marketplace/pb/ matches proto/ and exposes the contracts."""

from __future__ import annotations

import importlib
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

ROOT = pathlib.Path(__file__).resolve().parents[1]
GENERATE = ROOT / "scripts" / "generate.sh"

# The generated modules are imported from this checkout even when the
# project is not (or not yet) installed into the running interpreter.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# proto/<name>/<file>.proto -> package marketplace.<name>.v1 -> marketplace.pb.<name>.<file>_pb2
PROTOS = {
    "task": "task",
    "scheduler": "scheduler",
    "worker": "worker",
    "result": "result",
    "billing": "billing",
    "audit": "audit",
    "user": "user",
    "kafka": "messages",
}

# service -> {method: server_streaming}
SERVICES = {
    "task": (
        "TaskService",
        {
            "CreateTask": False,
            "GetTask": False,
            "ListTasks": False,
            "CancelTask": False,
            "WatchTask": True,
            "GetSubTasks": False,
        },
    ),
    "scheduler": (
        "SchedulerService",
        {"Schedule": False, "Reschedule": False, "QueueStats": False},
    ),
    "worker": (
        "WorkerService",
        {
            "Register": False,
            "Heartbeat": False,
            "ListWorkers": False,
            "Capabilities": False,
            "EnrollNode": False,
            "ListNodes": False,
            "DisableNode": False,
            "RotateNode": False,
        },
    ),
    "result": (
        "ResultService",
        {"SavePartial": False, "Finalize": False, "GetResult": False},
    ),
    "billing": (
        "BillingService",
        {
            "GetBalance": False,
            "GetLedger": False,
            "Charge": False,
            "GetQuota": False,
            "TopUp": False,
        },
    ),
    "audit": (
        "AuditService",
        {"Append": False, "Query": False, "Verify": False, "GetPublicKey": False},
    ),
    "user": (
        "UserService",
        {"CreateUser": False, "Authenticate": False, "GetUser": False},
    ),
}

KAFKA_MESSAGES = [
    "TaskCreated",
    "TaskAssigned",
    "SubTaskCompleted",
    "TaskCompleted",
    "TaskFailed",
    "AuditEvent",
    "SubmitTask",
]


def _module(name: str, suffix: str):
    return importlib.import_module(f"marketplace.pb.{name}.{PROTOS[name]}{suffix}")


def test_generated_code_is_up_to_date():
    if shutil.which("bash") is None:
        pytest.skip("bash is needed to run scripts/generate.sh")
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["PYTHON"] = sys.executable
    proc = subprocess.run(
        ["bash", str(GENERATE), "--check"],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, (
        "scripts/generate.sh --check failed (regenerate with scripts/generate.sh):\n"
        + proc.stdout
        + proc.stderr
    )


@pytest.mark.parametrize("name", sorted(PROTOS))
def test_modules_import_with_versioned_packages(name):
    pb2 = _module(name, "_pb2")
    _module(name, "_pb2_grpc")
    assert pb2.DESCRIPTOR.package == f"marketplace.{name}.v1"
    assert pb2.DESCRIPTOR.name == f"marketplace/pb/{name}/{PROTOS[name]}.proto"
    # Self-contained: nothing but the well-known types is imported.
    for dep in pb2.DESCRIPTOR.dependencies:
        assert dep.name.startswith("google/protobuf/"), dep.name
    assert (ROOT / "proto" / name / f"{PROTOS[name]}.proto").is_file()


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_methods(name):
    service_name, methods = SERVICES[name]
    pb2 = _module(name, "_pb2")
    grpc_mod = _module(name, "_pb2_grpc")
    service = pb2.DESCRIPTOR.services_by_name[service_name]
    assert service.full_name == f"marketplace.{name}.v1.{service_name}"
    assert {m.name for m in service.methods} == set(methods)
    for method_name, streaming in methods.items():
        method = service.methods_by_name[method_name]
        assert method.server_streaming is streaming, method_name
        assert method.client_streaming is False, method_name
        assert method.input_type.name == f"{method_name}Request"
        assert method.output_type.name == f"{method_name}Response"
    # Stub, servicer base class and registration helper are all generated.
    assert hasattr(grpc_mod, f"{service_name}Stub")
    servicer = getattr(grpc_mod, f"{service_name}Servicer")
    for method_name in methods:
        assert callable(getattr(servicer, method_name))
    assert callable(getattr(grpc_mod, f"add_{service_name}Servicer_to_server"))


def test_money_is_never_floating_point():
    from google.protobuf.descriptor import FieldDescriptor

    money = {
        "cost",
        "estimated_cost",
        "max_cost",
        "amount",
        "balance",
        "held",
        "available",
        "daily_spend_limit",
        "spent_today",
    }

    def walk(message):
        yield message
        for nested in message.nested_types:
            yield from walk(nested)

    for name in PROTOS:
        pb2 = _module(name, "_pb2")
        for top in pb2.DESCRIPTOR.message_types_by_name.values():
            for message in walk(top):
                for field in message.fields:
                    if field.name in money:
                        assert field.type == FieldDescriptor.TYPE_STRING, (
                            f"{message.full_name}.{field.name}"
                        )


def test_task_document_fields_mirror_rest():
    from marketplace.pb.task import task_pb2

    fields = set(task_pb2.Task.DESCRIPTOR.fields_by_name)
    assert {
        "id",
        "status",
        "model",
        "device",
        "progress",
        "cost",
        "estimated_cost",
        "created_at",
        "started_at",
        "finished_at",
        "error",
        "status_reason",
        "trace_id",
    } <= fields
    assert set(task_pb2.Progress.DESCRIPTOR.fields_by_name) == {
        "done",
        "failed",
        "total",
    }
    assert {
        "model",
        "inputs",
        "params_json",
        "device",
        "batch_size",
        "priority",
        "webhook_url",
        "max_cost",
        "idempotency_key",
    } <= set(task_pb2.CreateTaskRequest.DESCRIPTOR.fields_by_name)

    task = task_pb2.Task(
        id="t1",
        status="Done",
        model="echo",
        progress=task_pb2.Progress(done=2, failed=0, total=2),
        cost="0.0020",
    )
    task.created_at.FromJsonString("2025-01-02T03:04:05Z")
    assert not task.HasField("finished_at")
    again = task_pb2.GetTaskResponse.FromString(
        task_pb2.GetTaskResponse(task=task).SerializeToString()
    )
    assert again.task == task
    assert again.task.created_at.ToJsonString() == "2025-01-02T03:04:05Z"


def test_kafka_messages_round_trip():
    from marketplace.pb.kafka import messages_pb2

    for name in KAFKA_MESSAGES:
        assert name in messages_pb2.DESCRIPTOR.message_types_by_name, name
    for name in KAFKA_MESSAGES[:-1]:
        fields = messages_pb2.DESCRIPTOR.message_types_by_name[name].fields_by_name
        assert {"event_id", "task_id", "user_id", "occurred_at"} <= set(fields), name
        assert fields["event_id"].type == fields["event_id"].TYPE_INT64

    occurred = Timestamp()
    occurred.FromJsonString("2025-06-01T12:00:00.123456Z")
    event = messages_pb2.TaskCreated(
        event_id=42,
        task_id="3f1c2e9a-0000-4000-8000-000000000001",
        user_id="9b7d0000-0000-4000-8000-000000000002",
        occurred_at=occurred,
        model="echo",
        device="cpu",
        total_items=3,
        batch_size=2,
        priority=5,
        estimated_cost="0.0030",
        idempotency_key="k-1",
    )
    data = event.SerializeToString()
    parsed = messages_pb2.TaskCreated.FromString(data)
    assert parsed == event
    assert parsed.event_id == 42
    assert parsed.estimated_cost == "0.0030"
    assert parsed.occurred_at.ToJsonString() == "2025-06-01T12:00:00.123456Z"
    assert json_format.MessageToDict(parsed)["eventId"] == "42"

    # The envelope carries any event; the consumer dispatches on the oneof.
    envelope = messages_pb2.Envelope(task_created=event)
    decoded = messages_pb2.Envelope.FromString(envelope.SerializeToString())
    assert decoded.WhichOneof("event") == "task_created"
    assert decoded.task_created == event

    done = messages_pb2.SubTaskCompleted(
        event_id=43,
        task_id=event.task_id,
        index=1,
        status="Done",
        seconds=0.25,
        items=1,
    )
    decoded = messages_pb2.Envelope.FromString(
        messages_pb2.Envelope(subtask_completed=done).SerializeToString()
    )
    assert decoded.WhichOneof("event") == "subtask_completed"
    assert decoded.subtask_completed.seconds == 0.25


def test_submit_task_round_trip():
    from marketplace.pb.kafka import messages_pb2

    submit = messages_pb2.SubmitTask(
        api_token="jwt",
        idempotency_key="order-7",
        model="echo",
        inputs=['"a"', '{"b": 1}', "2"],
        params_json="{}",
        device="any",
        batch_size=2,
        priority=1,
    )
    parsed = messages_pb2.SubmitTask.FromString(submit.SerializeToString())
    assert parsed.WhichOneof("principal") == "api_token"
    assert list(parsed.inputs) == ['"a"', '{"b": 1}', "2"]
    parsed.user_id = "u-1"  # the oneof switches principal
    assert parsed.WhichOneof("principal") == "user_id"
    assert parsed.api_token == ""
    with pytest.raises(DecodeError):
        messages_pb2.SubmitTask.FromString(b"\xff\xff\xff")

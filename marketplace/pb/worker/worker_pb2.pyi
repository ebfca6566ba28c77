import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Node(_message.Message):
    __slots__ = ("id", "name", "hostname", "queues", "public_key", "enabled", "created_at", "rotated_at", "disabled_at", "online")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ROTATED_AT_FIELD_NUMBER: _ClassVar[int]
    DISABLED_AT_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    hostname: str
    queues: _containers.RepeatedScalarFieldContainer[str]
    public_key: str
    enabled: bool
    created_at: _timestamp_pb2.Timestamp
    rotated_at: _timestamp_pb2.Timestamp
    disabled_at: _timestamp_pb2.Timestamp
    online: bool
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., hostname: _Optional[str] = ..., queues: _Optional[_Iterable[str]] = ..., public_key: _Optional[str] = ..., enabled: _Optional[bool] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., rotated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., disabled_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., online: _Optional[bool] = ...) -> None: ...

class EnrollNodeRequest(_message.Message):
    __slots__ = ("name", "queues")
    NAME_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    name: str
    queues: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., queues: _Optional[_Iterable[str]] = ...) -> None: ...

class EnrollNodeResponse(_message.Message):
    __slots__ = ("node", "credential_json")
    NODE_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_JSON_FIELD_NUMBER: _ClassVar[int]
    node: Node
    credential_json: str
    def __init__(self, node: _Optional[_Union[Node, _Mapping]] = ..., credential_json: _Optional[str] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[Node]
    def __init__(self, nodes: _Optional[_Iterable[_Union[Node, _Mapping]]] = ...) -> None: ...

class DisableNodeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DisableNodeResponse(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: Node
    def __init__(self, node: _Optional[_Union[Node, _Mapping]] = ...) -> None: ...

class RotateNodeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RotateNodeResponse(_message.Message):
    __slots__ = ("node", "credential_json")
    NODE_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_JSON_FIELD_NUMBER: _ClassVar[int]
    node: Node
    credential_json: str
    def __init__(self, node: _Optional[_Union[Node, _Mapping]] = ..., credential_json: _Optional[str] = ...) -> None: ...

class ClaimSubtaskRequest(_message.Message):
    __slots__ = ("subtask_id", "message_id", "incarnation")
    SUBTASK_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    subtask_id: str
    message_id: str
    incarnation: str
    def __init__(self, subtask_id: _Optional[str] = ..., message_id: _Optional[str] = ..., incarnation: _Optional[str] = ...) -> None: ...

class ClaimSubtaskResponse(_message.Message):
    __slots__ = ("run", "work_json", "outcome_json", "ticket")
    RUN_FIELD_NUMBER: _ClassVar[int]
    WORK_JSON_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_JSON_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    run: bool
    work_json: str
    outcome_json: str
    ticket: str
    def __init__(self, run: _Optional[bool] = ..., work_json: _Optional[str] = ..., outcome_json: _Optional[str] = ..., ticket: _Optional[str] = ...) -> None: ...

class CompleteSubtaskRequest(_message.Message):
    __slots__ = ("subtask_id", "attempt", "output", "sha256", "signature", "seconds", "work_json", "ticket")
    SUBTASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    WORK_JSON_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    subtask_id: str
    attempt: int
    output: bytes
    sha256: str
    signature: str
    seconds: float
    work_json: str
    ticket: str
    def __init__(self, subtask_id: _Optional[str] = ..., attempt: _Optional[int] = ..., output: _Optional[bytes] = ..., sha256: _Optional[str] = ..., signature: _Optional[str] = ..., seconds: _Optional[float] = ..., work_json: _Optional[str] = ..., ticket: _Optional[str] = ...) -> None: ...

class FailSubtaskRequest(_message.Message):
    __slots__ = ("subtask_id", "attempt", "error", "seconds", "kind", "work_json", "ticket", "message_id")
    SUBTASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    WORK_JSON_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    subtask_id: str
    attempt: int
    error: str
    seconds: float
    kind: str
    work_json: str
    ticket: str
    message_id: str
    def __init__(self, subtask_id: _Optional[str] = ..., attempt: _Optional[int] = ..., error: _Optional[str] = ..., seconds: _Optional[float] = ..., kind: _Optional[str] = ..., work_json: _Optional[str] = ..., ticket: _Optional[str] = ..., message_id: _Optional[str] = ...) -> None: ...

class CompleteSubtaskResponse(_message.Message):
    __slots__ = ("outcome_json",)
    OUTCOME_JSON_FIELD_NUMBER: _ClassVar[int]
    outcome_json: str
    def __init__(self, outcome_json: _Optional[str] = ...) -> None: ...

class FailSubtaskResponse(_message.Message):
    __slots__ = ("outcome_json",)
    OUTCOME_JSON_FIELD_NUMBER: _ClassVar[int]
    outcome_json: str
    def __init__(self, outcome_json: _Optional[str] = ...) -> None: ...

class NodeHeartbeatRequest(_message.Message):
    __slots__ = ("info_json", "leaving")
    INFO_JSON_FIELD_NUMBER: _ClassVar[int]
    LEAVING_FIELD_NUMBER: _ClassVar[int]
    info_json: str
    leaving: bool
    def __init__(self, info_json: _Optional[str] = ..., leaving: _Optional[bool] = ...) -> None: ...

class NodeHeartbeatResponse(_message.Message):
    __slots__ = ("hostname", "heartbeat_ttl_seconds")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    heartbeat_ttl_seconds: int
    def __init__(self, hostname: _Optional[str] = ..., heartbeat_ttl_seconds: _Optional[int] = ...) -> None: ...

class CheckStopRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class CheckStopResponse(_message.Message):
    __slots__ = ("stop",)
    STOP_FIELD_NUMBER: _ClassVar[int]
    stop: bool
    def __init__(self, stop: _Optional[bool] = ...) -> None: ...

class WorkerFacts(_message.Message):
    __slots__ = ("cpu_count", "memory_bytes", "gpu_name", "gpu_memory_bytes")
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_NAME_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    cpu_count: int
    memory_bytes: int
    gpu_name: str
    gpu_memory_bytes: int
    def __init__(self, cpu_count: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., gpu_name: _Optional[str] = ..., gpu_memory_bytes: _Optional[int] = ...) -> None: ...

class Worker(_message.Message):
    __slots__ = ("hostname", "queues", "models", "facts", "concurrency", "status", "running", "last_heartbeat", "registered_at", "provider", "node", "reputation")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    REPUTATION_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    queues: _containers.RepeatedScalarFieldContainer[str]
    models: _containers.RepeatedScalarFieldContainer[str]
    facts: WorkerFacts
    concurrency: int
    status: str
    running: int
    last_heartbeat: _timestamp_pb2.Timestamp
    registered_at: _timestamp_pb2.Timestamp
    provider: str
    node: str
    reputation: Reputation
    def __init__(self, hostname: _Optional[str] = ..., queues: _Optional[_Iterable[str]] = ..., models: _Optional[_Iterable[str]] = ..., facts: _Optional[_Union[WorkerFacts, _Mapping]] = ..., concurrency: _Optional[int] = ..., status: _Optional[str] = ..., running: _Optional[int] = ..., last_heartbeat: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., registered_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., provider: _Optional[str] = ..., node: _Optional[str] = ..., reputation: _Optional[_Union[Reputation, _Mapping]] = ...) -> None: ...

class Reputation(_message.Message):
    __slots__ = ("agreed", "disagreed", "score", "demoted")
    AGREED_FIELD_NUMBER: _ClassVar[int]
    DISAGREED_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DEMOTED_FIELD_NUMBER: _ClassVar[int]
    agreed: int
    disagreed: int
    score: float
    demoted: bool
    def __init__(self, agreed: _Optional[int] = ..., disagreed: _Optional[int] = ..., score: _Optional[float] = ..., demoted: _Optional[bool] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("hostname", "queues", "models", "facts", "concurrency")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    queues: _containers.RepeatedScalarFieldContainer[str]
    models: _containers.RepeatedScalarFieldContainer[str]
    facts: WorkerFacts
    concurrency: int
    def __init__(self, hostname: _Optional[str] = ..., queues: _Optional[_Iterable[str]] = ..., models: _Optional[_Iterable[str]] = ..., facts: _Optional[_Union[WorkerFacts, _Mapping]] = ..., concurrency: _Optional[int] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("worker", "heartbeat_ttl_seconds")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    worker: Worker
    heartbeat_ttl_seconds: int
    def __init__(self, worker: _Optional[_Union[Worker, _Mapping]] = ..., heartbeat_ttl_seconds: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("hostname", "running")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    running: int
    def __init__(self, hostname: _Optional[str] = ..., running: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("worker", "heartbeat_ttl_seconds")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    worker: Worker
    heartbeat_ttl_seconds: int
    def __init__(self, worker: _Optional[_Union[Worker, _Mapping]] = ..., heartbeat_ttl_seconds: _Optional[int] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ("status", "queue")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    status: str
    queue: str
    def __init__(self, status: _Optional[str] = ..., queue: _Optional[str] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[Worker]
    def __init__(self, workers: _Optional[_Iterable[_Union[Worker, _Mapping]]] = ...) -> None: ...

class CapabilitiesRequest(_message.Message):
    __slots__ = ("model", "device")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    model: str
    device: str
    def __init__(self, model: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class Capability(_message.Message):
    __slots__ = ("model", "device", "queue", "live_workers")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    LIVE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    model: str
    device: str
    queue: str
    live_workers: int
    def __init__(self, model: _Optional[str] = ..., device: _Optional[str] = ..., queue: _Optional[str] = ..., live_workers: _Optional[int] = ...) -> None: ...

class CapabilitiesResponse(_message.Message):
    __slots__ = ("capabilities",)
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    capabilities: _containers.RepeatedCompositeFieldContainer[Capability]
    def __init__(self, capabilities: _Optional[_Iterable[_Union[Capability, _Mapping]]] = ...) -> None: ...

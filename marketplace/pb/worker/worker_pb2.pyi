import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

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
    __slots__ = ("hostname", "queues", "models", "facts", "concurrency", "status", "running", "last_heartbeat", "registered_at")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    queues: _containers.RepeatedScalarFieldContainer[str]
    models: _containers.RepeatedScalarFieldContainer[str]
    facts: WorkerFacts
    concurrency: int
    status: str
    running: int
    last_heartbeat: _timestamp_pb2.Timestamp
    registered_at: _timestamp_pb2.Timestamp
    def __init__(self, hostname: _Optional[str] = ..., queues: _Optional[_Iterable[str]] = ..., models: _Optional[_Iterable[str]] = ..., facts: _Optional[_Union[WorkerFacts, _Mapping]] = ..., concurrency: _Optional[int] = ..., status: _Optional[str] = ..., running: _Optional[int] = ..., last_heartbeat: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., registered_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

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

import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskCreated(_message.Message):
    __slots__ = ("event_id", "task_id", "user_id", "occurred_at", "model", "device", "total_items", "batch_size", "priority", "estimated_cost", "idempotency_key", "trace_id", "redundancy")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ITEMS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_COST_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    REDUNDANCY_FIELD_NUMBER: _ClassVar[int]
    event_id: int
    task_id: str
    user_id: str
    occurred_at: _timestamp_pb2.Timestamp
    model: str
    device: str
    total_items: int
    batch_size: int
    priority: int
    estimated_cost: str
    idempotency_key: str
    trace_id: str
    redundancy: int
    def __init__(self, event_id: _Optional[int] = ..., task_id: _Optional[str] = ..., user_id: _Optional[str] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., model: _Optional[str] = ..., device: _Optional[str] = ..., total_items: _Optional[int] = ..., batch_size: _Optional[int] = ..., priority: _Optional[int] = ..., estimated_cost: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., trace_id: _Optional[str] = ..., redundancy: _Optional[int] = ...) -> None: ...

class TaskAssigned(_message.Message):
    __slots__ = ("event_id", "task_id", "user_id", "occurred_at", "queue", "subtask_count", "priority", "dispatch_count")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    SUBTASK_COUNT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    DISPATCH_COUNT_FIELD_NUMBER: _ClassVar[int]
    event_id: int
    task_id: str
    user_id: str
    occurred_at: _timestamp_pb2.Timestamp
    queue: str
    subtask_count: int
    priority: int
    dispatch_count: int
    def __init__(self, event_id: _Optional[int] = ..., task_id: _Optional[str] = ..., user_id: _Optional[str] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., queue: _Optional[str] = ..., subtask_count: _Optional[int] = ..., priority: _Optional[int] = ..., dispatch_count: _Optional[int] = ...) -> None: ...

class SubTaskCompleted(_message.Message):
    __slots__ = ("event_id", "task_id", "user_id", "occurred_at", "subtask_id", "index", "status", "seconds", "items", "worker", "attempts", "result_key", "result_sha256", "error")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    SUBTASK_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    RESULT_KEY_FIELD_NUMBER: _ClassVar[int]
    RESULT_SHA256_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    event_id: int
    task_id: str
    user_id: str
    occurred_at: _timestamp_pb2.Timestamp
    subtask_id: str
    index: int
    status: str
    seconds: float
    items: int
    worker: str
    attempts: int
    result_key: str
    result_sha256: str
    error: str
    def __init__(self, event_id: _Optional[int] = ..., task_id: _Optional[str] = ..., user_id: _Optional[str] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., subtask_id: _Optional[str] = ..., index: _Optional[int] = ..., status: _Optional[str] = ..., seconds: _Optional[float] = ..., items: _Optional[int] = ..., worker: _Optional[str] = ..., attempts: _Optional[int] = ..., result_key: _Optional[str] = ..., result_sha256: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class TaskCompleted(_message.Message):
    __slots__ = ("event_id", "task_id", "user_id", "occurred_at", "model", "cost", "result_key", "total_items", "subtask_count", "seconds")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    RESULT_KEY_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ITEMS_FIELD_NUMBER: _ClassVar[int]
    SUBTASK_COUNT_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    event_id: int
    task_id: str
    user_id: str
    occurred_at: _timestamp_pb2.Timestamp
    model: str
    cost: str
    result_key: str
    total_items: int
    subtask_count: int
    seconds: float
    def __init__(self, event_id: _Optional[int] = ..., task_id: _Optional[str] = ..., user_id: _Optional[str] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., model: _Optional[str] = ..., cost: _Optional[str] = ..., result_key: _Optional[str] = ..., total_items: _Optional[int] = ..., subtask_count: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class TaskFailed(_message.Message):
    __slots__ = ("event_id", "task_id", "user_id", "occurred_at", "model", "status", "error", "cost", "failed_subtasks")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    FAILED_SUBTASKS_FIELD_NUMBER: _ClassVar[int]
    event_id: int
    task_id: str
    user_id: str
    occurred_at: _timestamp_pb2.Timestamp
    model: str
    status: str
    error: str
    cost: str
    failed_subtasks: int
    def __init__(self, event_id: _Optional[int] = ..., task_id: _Optional[str] = ..., user_id: _Optional[str] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., model: _Optional[str] = ..., status: _Optional[str] = ..., error: _Optional[str] = ..., cost: _Optional[str] = ..., failed_subtasks: _Optional[int] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("event_id", "task_id", "user_id", "occurred_at", "seq", "actor", "action", "subject", "data_json", "prev_hash", "hash", "signature")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    DATA_JSON_FIELD_NUMBER: _ClassVar[int]
    PREV_HASH_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    event_id: int
    task_id: str
    user_id: str
    occurred_at: _timestamp_pb2.Timestamp
    seq: int
    actor: str
    action: str
    subject: str
    data_json: str
    prev_hash: str
    hash: str
    signature: str
    def __init__(self, event_id: _Optional[int] = ..., task_id: _Optional[str] = ..., user_id: _Optional[str] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., seq: _Optional[int] = ..., actor: _Optional[str] = ..., action: _Optional[str] = ..., subject: _Optional[str] = ..., data_json: _Optional[str] = ..., prev_hash: _Optional[str] = ..., hash: _Optional[str] = ..., signature: _Optional[str] = ...) -> None: ...

class AuditCheckpoint(_message.Message):
    __slots__ = ("event_id", "occurred_at", "log", "size", "head", "root", "time", "signature")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    ROOT_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    event_id: int
    occurred_at: _timestamp_pb2.Timestamp
    log: str
    size: int
    head: str
    root: str
    time: str
    signature: str
    def __init__(self, event_id: _Optional[int] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., log: _Optional[str] = ..., size: _Optional[int] = ..., head: _Optional[str] = ..., root: _Optional[str] = ..., time: _Optional[str] = ..., signature: _Optional[str] = ...) -> None: ...

class Envelope(_message.Message):
    __slots__ = ("task_created", "task_assigned", "subtask_completed", "task_completed", "task_failed", "audit_event", "audit_checkpoint", "subtask_verified")
    TASK_CREATED_FIELD_NUMBER: _ClassVar[int]
    TASK_ASSIGNED_FIELD_NUMBER: _ClassVar[int]
    SUBTASK_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    TASK_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    TASK_FAILED_FIELD_NUMBER: _ClassVar[int]
    AUDIT_EVENT_FIELD_NUMBER: _ClassVar[int]
    AUDIT_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    SUBTASK_VERIFIED_FIELD_NUMBER: _ClassVar[int]
    task_created: TaskCreated
    task_assigned: TaskAssigned
    subtask_completed: SubTaskCompleted
    task_completed: TaskCompleted
    task_failed: TaskFailed
    audit_event: AuditEvent
    audit_checkpoint: AuditCheckpoint
    subtask_verified: SubTaskVerified
    def __init__(self, task_created: _Optional[_Union[TaskCreated, _Mapping]] = ..., task_assigned: _Optional[_Union[TaskAssigned, _Mapping]] = ..., subtask_completed: _Optional[_Union[SubTaskCompleted, _Mapping]] = ..., task_completed: _Optional[_Union[TaskCompleted, _Mapping]] = ..., task_failed: _Optional[_Union[TaskFailed, _Mapping]] = ..., audit_event: _Optional[_Union[AuditEvent, _Mapping]] = ..., audit_checkpoint: _Optional[_Union[AuditCheckpoint, _Mapping]] = ..., subtask_verified: _Optional[_Union[SubTaskVerified, _Mapping]] = ...) -> None: ...

class SubTaskVerified(_message.Message):
    __slots__ = ("event_id", "task_id", "user_id", "occurred_at", "index", "accepted_subtask_id", "accepted_replica", "accepted_node", "result_sha256", "replicas", "agreed_nodes", "disagreed_nodes")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_SUBTASK_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_REPLICA_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_NODE_FIELD_NUMBER: _ClassVar[int]
    RESULT_SHA256_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    AGREED_NODES_FIELD_NUMBER: _ClassVar[int]
    DISAGREED_NODES_FIELD_NUMBER: _ClassVar[int]
    event_id: int
    task_id: str
    user_id: str
    occurred_at: _timestamp_pb2.Timestamp
    index: int
    accepted_subtask_id: str
    accepted_replica: int
    accepted_node: str
    result_sha256: str
    replicas: int
    agreed_nodes: _containers.RepeatedScalarFieldContainer[str]
    disagreed_nodes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, event_id: _Optional[int] = ..., task_id: _Optional[str] = ..., user_id: _Optional[str] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., index: _Optional[int] = ..., accepted_subtask_id: _Optional[str] = ..., accepted_replica: _Optional[int] = ..., accepted_node: _Optional[str] = ..., result_sha256: _Optional[str] = ..., replicas: _Optional[int] = ..., agreed_nodes: _Optional[_Iterable[str]] = ..., disagreed_nodes: _Optional[_Iterable[str]] = ...) -> None: ...

class SubmitTask(_message.Message):
    __slots__ = ("api_token", "user_id", "idempotency_key", "model", "inputs", "params_json", "device", "batch_size", "priority", "webhook_url", "max_cost", "redundancy")
    API_TOKEN_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    WEBHOOK_URL_FIELD_NUMBER: _ClassVar[int]
    MAX_COST_FIELD_NUMBER: _ClassVar[int]
    REDUNDANCY_FIELD_NUMBER: _ClassVar[int]
    api_token: str
    user_id: str
    idempotency_key: str
    model: str
    inputs: _containers.RepeatedScalarFieldContainer[str]
    params_json: str
    device: str
    batch_size: int
    priority: int
    webhook_url: str
    max_cost: str
    redundancy: int
    def __init__(self, api_token: _Optional[str] = ..., user_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., model: _Optional[str] = ..., inputs: _Optional[_Iterable[str]] = ..., params_json: _Optional[str] = ..., device: _Optional[str] = ..., batch_size: _Optional[int] = ..., priority: _Optional[int] = ..., webhook_url: _Optional[str] = ..., max_cost: _Optional[str] = ..., redundancy: _Optional[int] = ...) -> None: ...

class DeadLetter(_message.Message):
    __slots__ = ("payload", "key", "reason", "source_topic", "partition", "offset", "occurred_at")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TOPIC_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    key: bytes
    reason: str
    source_topic: str
    partition: int
    offset: int
    occurred_at: _timestamp_pb2.Timestamp
    def __init__(self, payload: _Optional[bytes] = ..., key: _Optional[bytes] = ..., reason: _Optional[str] = ..., source_topic: _Optional[str] = ..., partition: _Optional[int] = ..., offset: _Optional[int] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

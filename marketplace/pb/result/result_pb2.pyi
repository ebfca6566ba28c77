from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SavePartialRequest(_message.Message):
    __slots__ = ("task_id", "index", "outputs", "error", "seconds", "worker")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    index: int
    outputs: _containers.RepeatedScalarFieldContainer[str]
    error: str
    seconds: float
    worker: str
    def __init__(self, task_id: _Optional[str] = ..., index: _Optional[int] = ..., outputs: _Optional[_Iterable[str]] = ..., error: _Optional[str] = ..., seconds: _Optional[float] = ..., worker: _Optional[str] = ...) -> None: ...

class SavePartialResponse(_message.Message):
    __slots__ = ("key", "sha256", "items")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    key: str
    sha256: str
    items: int
    def __init__(self, key: _Optional[str] = ..., sha256: _Optional[str] = ..., items: _Optional[int] = ...) -> None: ...

class FinalizeRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class FinalizeResponse(_message.Message):
    __slots__ = ("task_id", "status", "result_key", "cost", "error")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESULT_KEY_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    status: str
    result_key: str
    cost: str
    error: str
    def __init__(self, task_id: _Optional[str] = ..., status: _Optional[str] = ..., result_key: _Optional[str] = ..., cost: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class GetResultRequest(_message.Message):
    __slots__ = ("task_id", "partial")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    partial: bool
    def __init__(self, task_id: _Optional[str] = ..., partial: _Optional[bool] = ...) -> None: ...

class MissingPart(_message.Message):
    __slots__ = ("index", "first_item", "items", "status", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FIRST_ITEM_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    first_item: int
    items: int
    status: str
    error: str
    def __init__(self, index: _Optional[int] = ..., first_item: _Optional[int] = ..., items: _Optional[int] = ..., status: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class GetResultResponse(_message.Message):
    __slots__ = ("task_id", "model", "outputs", "status", "complete", "missing")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    model: str
    outputs: _containers.RepeatedScalarFieldContainer[str]
    status: str
    complete: bool
    missing: _containers.RepeatedCompositeFieldContainer[MissingPart]
    def __init__(self, task_id: _Optional[str] = ..., model: _Optional[str] = ..., outputs: _Optional[_Iterable[str]] = ..., status: _Optional[str] = ..., complete: _Optional[bool] = ..., missing: _Optional[_Iterable[_Union[MissingPart, _Mapping]]] = ...) -> None: ...

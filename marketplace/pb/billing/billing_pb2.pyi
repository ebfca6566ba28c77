import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LedgerEntry(_message.Message):
    __slots__ = ("id", "user_id", "task_id", "subtask_id", "kind", "amount", "detail", "settled", "created_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SUBTASK_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    SETTLED_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: int
    user_id: str
    task_id: str
    subtask_id: str
    kind: str
    amount: str
    detail: str
    settled: bool
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[int] = ..., user_id: _Optional[str] = ..., task_id: _Optional[str] = ..., subtask_id: _Optional[str] = ..., kind: _Optional[str] = ..., amount: _Optional[str] = ..., detail: _Optional[str] = ..., settled: _Optional[bool] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetBalanceRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class GetBalanceResponse(_message.Message):
    __slots__ = ("user_id", "balance", "held", "available")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    BALANCE_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    balance: str
    held: str
    available: str
    def __init__(self, user_id: _Optional[str] = ..., balance: _Optional[str] = ..., held: _Optional[str] = ..., available: _Optional[str] = ...) -> None: ...

class GetLedgerRequest(_message.Message):
    __slots__ = ("task_id", "limit", "cursor", "user_id")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    limit: int
    cursor: str
    user_id: str
    def __init__(self, task_id: _Optional[str] = ..., limit: _Optional[int] = ..., cursor: _Optional[str] = ..., user_id: _Optional[str] = ...) -> None: ...

class GetLedgerResponse(_message.Message):
    __slots__ = ("entries", "next_cursor")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_CURSOR_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[LedgerEntry]
    next_cursor: str
    def __init__(self, entries: _Optional[_Iterable[_Union[LedgerEntry, _Mapping]]] = ..., next_cursor: _Optional[str] = ...) -> None: ...

class ChargeRequest(_message.Message):
    __slots__ = ("task_id", "subtask_id", "amount", "kind", "detail")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SUBTASK_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    subtask_id: str
    amount: str
    kind: str
    detail: str
    def __init__(self, task_id: _Optional[str] = ..., subtask_id: _Optional[str] = ..., amount: _Optional[str] = ..., kind: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class ChargeResponse(_message.Message):
    __slots__ = ("entry", "created")
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    entry: LedgerEntry
    created: bool
    def __init__(self, entry: _Optional[_Union[LedgerEntry, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class Quota(_message.Message):
    __slots__ = ("max_active_tasks", "max_items_per_task", "daily_spend_limit")
    MAX_ACTIVE_TASKS_FIELD_NUMBER: _ClassVar[int]
    MAX_ITEMS_PER_TASK_FIELD_NUMBER: _ClassVar[int]
    DAILY_SPEND_LIMIT_FIELD_NUMBER: _ClassVar[int]
    max_active_tasks: int
    max_items_per_task: int
    daily_spend_limit: str
    def __init__(self, max_active_tasks: _Optional[int] = ..., max_items_per_task: _Optional[int] = ..., daily_spend_limit: _Optional[str] = ...) -> None: ...

class QuotaUsage(_message.Message):
    __slots__ = ("active_tasks", "spent_today")
    ACTIVE_TASKS_FIELD_NUMBER: _ClassVar[int]
    SPENT_TODAY_FIELD_NUMBER: _ClassVar[int]
    active_tasks: int
    spent_today: str
    def __init__(self, active_tasks: _Optional[int] = ..., spent_today: _Optional[str] = ...) -> None: ...

class GetQuotaRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class GetQuotaResponse(_message.Message):
    __slots__ = ("user_id", "quota", "usage")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    quota: Quota
    usage: QuotaUsage
    def __init__(self, user_id: _Optional[str] = ..., quota: _Optional[_Union[Quota, _Mapping]] = ..., usage: _Optional[_Union[QuotaUsage, _Mapping]] = ...) -> None: ...

class TopUpRequest(_message.Message):
    __slots__ = ("user_id", "amount", "detail")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    amount: str
    detail: str
    def __init__(self, user_id: _Optional[str] = ..., amount: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class TopUpResponse(_message.Message):
    __slots__ = ("entry", "balance")
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    BALANCE_FIELD_NUMBER: _ClassVar[int]
    entry: LedgerEntry
    balance: str
    def __init__(self, entry: _Optional[_Union[LedgerEntry, _Mapping]] = ..., balance: _Optional[str] = ...) -> None: ...

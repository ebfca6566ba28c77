"""REST request/response bodies that are not shared with other transports."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from marketplace.tasks.schemas import MAX_SUBTASK_PAGE


class LoginRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: str = Field(min_length=3, max_length=320)
    password: str = Field(min_length=1, max_length=256)


class UserOut(BaseModel):
    id: str
    email: str


class TokenPair(BaseModel):
    access_token: str
    refresh_token: str
    token_type: str = "Bearer"
    expires_in: int


class AccessToken(BaseModel):
    access_token: str
    token_type: str = "Bearer"
    expires_in: int


class Usage(BaseModel):
    active_tasks: int
    spent_today: str  # credits charged today (UTC), a decimal string


class MeOut(BaseModel):
    id: str
    email: str
    role: Literal["user", "admin"]
    balance: str = Field(description="Settled balance.")
    available_balance: str = Field(description="Balance less the holds of running tasks.")
    quotas: dict[str, Any]
    usage: Usage
    webhook_secret: str = Field(description="Key of the HMAC-SHA256 `X-Marketplace-Signature` on webhooks.")


class TaskAccepted(BaseModel):
    id: str
    status: str
    model: str
    subtasks: int
    redundancy: int = 1
    estimated_cost: str
    links: dict[str, str]


class TaskListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["Created", "Scheduled", "InProgress", "Done", "Failed", "Cancelled"] | None = None
    limit: int = Field(default=20, ge=1, le=100)
    cursor: str | None = Field(default=None, max_length=512, description="`next_cursor` of the previous page.")
    all: Literal["0", "1"] = Field(default="0", description="Admins: `1` lists every user's tasks.")


class SubTaskQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["Pending", "Running", "Done", "Failed"] | None = None
    limit: int | None = Field(default=None, ge=1, le=MAX_SUBTASK_PAGE, description=(
        "At most this many, in index order (all of them when absent); `next_after` gives the next page."))
    after: int = Field(default=-1, ge=-1, description="Only subtasks with a higher index: the previous page's `next_after`.")


class ResultQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    partial: bool = Field(default=False, description=(
        "Whatever the task's status, the outputs it has: null for the items of subtasks that are "
        "not Done, listed in `missing` (a Failed or Cancelled job's finished subtasks were charged)."))


class EventsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    outputs: bool = Field(default=False, description="Each Done subtask's event carries its outputs.")
    last_event_id: int | None = Field(default=None, ge=0, description=(
        "Resume after this event id, for clients that cannot send the `Last-Event-ID` header "
        "(the header wins when both are given)."))


class FileOut(BaseModel):
    id: str
    size: int
    sha256: str
    content_type: str
    filename: str | None = None
    created_at: str

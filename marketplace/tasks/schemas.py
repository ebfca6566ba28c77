"""Request and response shapes shared by REST, gRPC and the Kafka submissions consumer."""
from __future__ import annotations

from decimal import Decimal
from typing import Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator

# How deep an input item or a parameter may nest. The request is hashed and stored through
# pydantic's serializer, which refuses 255 levels and more (a 500); real items nest a few levels.
MAX_NESTING = 64
MAX_REDUNDANCY = 5


def _too_deep(value: Any, limit: int = MAX_NESTING) -> bool:
    """Whether `value` nests lists/objects more than `limit` levels; iterative, as the bodies it
    checks are hostile by assumption."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (list, dict)))
    return False


class TaskRequest(BaseModel):
    """A job: one model over a list of input items."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=64, description="Catalog model name, e.g. `echo`, `embedding`.")
    inputs: list[Any] = Field(min_length=1, description="Input items; their kind depends on the model.")
    params: dict[str, Any] = Field(default_factory=dict, description=(
        "Model parameters, checked at submit: `GET /v1/models` gives each model's `params_schema`."))
    device: Literal["any", "cpu", "gpu"] = "any"
    # strict: JSON `true` or "5" is a mistake to name, not a 1 or a 5 to guess.
    batch_size: int | None = Field(default=None, ge=1, strict=True, description=(
        "At most this many items per subtask (model default if absent): the inputs are spread "
        "evenly over ceil(n / batch_size) subtasks."))
    priority: int = Field(default=0, ge=0, le=9, strict=True, description="0–9, 9 most urgent.")
    webhook_url: AnyHttpUrl | None = Field(default=None, description="POSTed the task document on a final status.")
    redundancy: int | None = Field(default=None, ge=1, le=MAX_REDUNDANCY, strict=True, description=(
        "Verified results: run each subtask on this many distinct nodes (1-5) and accept the output a "
        "majority agrees on; priced this many times. Absent: your minimum (default 1)."))
    max_cost: Decimal | None = Field(default=None, gt=0, max_digits=24, decimal_places=6)

    @field_validator("inputs")
    @classmethod
    def _inputs_not_too_deep(cls, value: list[Any]) -> list[Any]:
        for i, item in enumerate(value):
            if isinstance(item, (list, dict)) and _too_deep(item):
                raise ValueError(f"item {i} nests more than {MAX_NESTING} levels")
        return value

    @field_validator("params")
    @classmethod
    def _params_not_too_deep(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name, param in value.items():
            if isinstance(param, (list, dict)) and _too_deep(param):
                raise ValueError(f"{name!r} nests more than {MAX_NESTING} levels")
        return value

    @field_validator("max_cost", mode="before")
    @classmethod
    def _no_float_money(cls, value: Any) -> Any:
        # Floats are accepted on input for convenience but turned into exact decimals.
        return Decimal(str(value)) if isinstance(value, float) else value


class Progress(BaseModel):
    done: int
    failed: int
    total: int


class TaskOut(BaseModel):
    id: str
    status: Literal["Created", "Scheduled", "InProgress", "Done", "Failed", "Cancelled"]
    model: str
    device: str
    queue: str | None = None
    priority: int
    progress: Progress
    total_items: int
    subtasks: int = Field(description="Subtask runs: each batch once per replica (redundancy, spot checks).")
    redundancy: int = 1
    estimated_cost: str
    cost: str | None = Field(description="Settled cost, or the running sum of charges before the end.")
    created_at: str
    scheduled_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    error: str | None = None
    status_reason: str | None = Field(default=None, description=(
        "Why it is not running, while it waits: for a node, or for a slot (fair sharing with other users)."))
    queue_position: int | None = Field(default=None, description=(
        "While it waits for a slot: about how many subtasks start before its next one."))
    trace_id: str | None = None
    links: dict[str, str] = {}


class ReplicaOut(BaseModel):
    id: str
    replica: int = Field(description="0 for the first run; more for the other replicas, spot checks and tie-breaks.")
    status: str
    node: str | None = Field(default=None, description="The node's hostname.")
    provider: str | None = Field(default=None, description="The provider's user id; null for the operator's nodes.")
    output_sha256: str | None = None
    agreed: bool | None = Field(default=None, description="Whether it agreed with the accepted output; null until decided.")
    platform_paid: bool = Field(default=False, description="A spot check or tie-break, at the platform's cost.")


class SubTaskOut(BaseModel):
    id: str
    index: int
    status: Literal["Pending", "Running", "Done", "Failed", "Cancelled"] = Field(description=(
        "Pending (waiting for a slot), Running, Done, Failed, or Cancelled (its task ended before it finished)."))
    items: int
    worker: str | None = None
    attempts: int
    seconds: float | None = None
    error: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    replicas: list[ReplicaOut] | None = Field(default=None, description=(
        "Where the subtask ran on several nodes (redundancy, a spot check): each run, and whether it agreed."))


MAX_SUBTASK_PAGE = 1000  # subtasks per page (REST `limit`, gRPC `limit`)


class SubTaskList(BaseModel):
    task_id: str
    subtasks: list[SubTaskOut]
    next_after: int | None = Field(default=None, description=(
        "With `limit`: pass as `after` for the next page; null at the end."))


class MissingPart(BaseModel):
    index: int = Field(description="The subtask's index.")
    first_item: int = Field(description="Index in `inputs` of its first item.")
    items: int = Field(description="Its item count: `outputs` holds that many nulls from `first_item`.")
    status: str = Field(description="The subtask's status (Pending, Running, Failed or Cancelled).")
    error: str | None = None


class TaskResult(BaseModel):
    task_id: str
    model: str
    outputs: list[Any] = Field(description="In input order; with `partial=true`, null for each missing item.")
    status: str | None = Field(default=None, description="With `partial=true`: the task's status.")
    complete: bool | None = Field(default=None, description="With `partial=true`: whether every output is here.")
    missing: list[MissingPart] | None = Field(default=None, description=(
        "With `partial=true`: the subtasks whose outputs are not here (not run, running, failed)."))


class TaskPage(BaseModel):
    tasks: list[TaskOut]
    next_cursor: str | None = Field(default=None, description="Pass as `cursor` for the next page; null at the end.")

"""Each model's `params`, checked at submit.

A wrong parameter is a 422 naming `params.<name>` when the job is sent, not a subtask
that fails on a node minutes later (or, for a type a node would not expect, crashes
and retries first). JSON types are taken as they are (strict: `"5"` is not a number,
`true` is not 1), and a name the model does not know is refused: a typo would
otherwise silently run with the default. The executors keep their own checks.
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from marketplace.infra.errors import InvalidInput
from marketplace.registry.weights import VERSION_RE

# Bounds the executors enforce too (workers import these).
MAX_SLEEP_S = 5.0
MAX_TOP_K = 20
MAX_TIMEOUT_S = 600.0
MIN_MEMORY_MB = 16  # below this not even a shell starts under RLIMIT_AS
MAX_MEMORY_MB = 4096
# Items per forward pass when the job names none: a GPU wants more than a CPU core.
ENCODE_BATCH = {"cpu": 64, "gpu": 256}
INFERENCE_BATCH = {"cpu": 16, "gpu": 64}


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class EchoParams(_Params):
    sleep_s: float = Field(0, ge=0, le=MAX_SLEEP_S, description="Seconds to sleep per item (tests, demos).")
    fail_items: list[Any] = Field(default_factory=list, description="Items that fail their subtask.")


class EmbeddingParams(_Params):
    encode_batch_size: int = Field(ENCODE_BATCH["cpu"], ge=1, le=1024,
                                   description="Sentences per forward pass (default 64 on CPU, 256 on GPU).")
    normalize: bool = Field(True, description="Unit-length vectors.")


class ResNet50Params(_Params):
    version: str = Field("v1", pattern=VERSION_RE.pattern, description="Weights pushed with `marketplace models push`.")
    top_k: int = Field(5, ge=1, le=MAX_TOP_K, description="Labels per image.")
    inference_batch_size: int = Field(INFERENCE_BATCH["cpu"], ge=1, le=256,
                                      description="Images per forward pass (default 16 on CPU, 64 on GPU).")


class GenericParams(_Params):
    command: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1, description="argv run in the sandbox.")
    timeout_s: float = Field(10, gt=0, le=MAX_TIMEOUT_S, description=(
        "Wall-clock limit per subtask; at most the model's time limit less a margin (590 s as shipped)."))
    memory_mb: int = Field(256, ge=MIN_MEMORY_MB, le=MAX_MEMORY_MB, description="Memory of the whole run, all its processes together (MB).")


PARAMS: dict[str, type[_Params]] = {
    "echo": EchoParams, "embedding": EmbeddingParams, "resnet50": ResNet50Params, "generic": GenericParams,
}


def check_params(model: str, params: dict[str, Any]) -> None:
    """Raise InvalidInput naming each bad `params.<field>`; models without a schema take anything."""
    schema = PARAMS.get(model)
    if schema is None:
        return
    try:
        schema.model_validate(params)
    except ValidationError as exc:
        errors = [{"field": _field(err["loc"]), "message": err["msg"]} for err in exc.errors()]
        raise InvalidInput("; ".join(f"{e['field']}: {e['message']}" for e in errors), errors=errors) from None


def _field(loc: tuple[Any, ...]) -> str:
    """`params.command[1]`: the names the rest of the API gives fields (`inputs[0]`)."""
    return "params" + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)

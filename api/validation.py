"""Parse and validate request bodies with pydantic; errors name each failing field."""
from __future__ import annotations

from typing import Any, TypeVar

from flask import current_app, request
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge

from marketplace.infra.errors import InvalidInput
from marketplace.tasks.storable import check_storable

M = TypeVar("M", bound=BaseModel)


def _field(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def validation_problem(exc: ValidationError) -> InvalidInput:
    errors = [{"field": _field(e["loc"]), "message": e["msg"]} for e in exc.errors(include_url=False)]
    first = errors[0]
    return InvalidInput(f"{first['field']}: {first['message']}", errors=errors)


def validate(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_problem(exc) from None


def parse_body(model: type[M]) -> M:
    """The JSON body as `model`: 400 when it is not JSON, 422 naming fields when invalid."""
    if not request.is_json:
        raise BadRequest("the request body must be JSON (Content-Type: application/json)")
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    # A chunked body (no Content-Length) is cut at the limit without an error, and the cut JSON
    # read as "not valid JSON" (400); the declared-length case is refused before (api/errors.py).
    if limit and not request.content_length and len(request.get_data(cache=True)) >= limit:
        raise RequestEntityTooLarge(f"the request body exceeds {limit} bytes")
    try:
        data = request.get_json(force=False, silent=False)
    except BadRequest:
        raise BadRequest("the request body is not valid JSON") from None
    except RecursionError:  # valid JSON, nested past the parser's stack
        raise InvalidInput.field("body", "nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidInput.field("body", "expected a JSON object")
    check_storable(data)
    return validate(model, data)


def parse_query(model: type[M]) -> M:
    return validate(model, request.args.to_dict())

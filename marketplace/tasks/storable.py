"""What PostgreSQL cannot store, refused at the edge (REST, gRPC, Kafka) as a 4xx naming the field.

NUL characters, lone surrogates (JSON's `\\ud800`) and NaN/Infinity pass JSON parsers but
fail the INSERT (text, jsonb), which was a 500 or gRPC INTERNAL after the work had begun.
"""
from __future__ import annotations

import math
from typing import Any

from marketplace.infra.errors import InvalidInput


def bad_text(text: str) -> str | None:
    if "\x00" in text:
        return "NUL characters (\\u0000) are not allowed"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # JSON may carry lone surrogates (\ud800) that no UTF-8 store accepts
        return "invalid Unicode (a lone surrogate) is not allowed"
    return None


def check_storable(value: Any, where: str = "") -> None:
    """InvalidInput naming the first value (`where` its path) PostgreSQL would refuse."""
    try:
        _check(value, where)
    except RecursionError:
        raise InvalidInput.field(where or "body", "nested too deeply") from None


def _check(value: Any, where: str) -> None:
    if isinstance(value, str):
        problem = bad_text(value)
        if problem:
            raise InvalidInput.field(where or "body", problem)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInput.field(where or "body", "NaN and Infinity are not allowed")
    elif isinstance(value, dict):
        for key, item in value.items():
            problem = bad_text(key)
            if problem:
                raise InvalidInput.field(where or "body", f"{problem} in keys")
            _check(item, f"{where}.{key}" if where else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check(item, f"{where}[{i}]")

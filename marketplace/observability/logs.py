"""JSON log lines with the ids that tie a line to a job, and secrets scrubbed out.

Every process (API/gunicorn, gRPC, bridge, Celery workers and beat) logs one
JSON object per line on stdout: `ts, level, logger, message` plus `trace_id`,
`span_id` (the current OpenTelemetry span), `task_id`, `subtask_id`, `user_id`
(our ids, not Celery's) where known. Our ids live in context variables: the
API binds them after auth and at submit, the Celery signal handlers bind them
around every task run (see `marketplace.observability.celery`).
"""
from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import IO, Any

ID_FIELDS = ("task_id", "subtask_id", "user_id")
_ids: dict[str, contextvars.ContextVar[str | None]] = {
    name: contextvars.ContextVar(f"marketplace_{name}", default=None) for name in ID_FIELDS
}

# Standard LogRecord attributes: anything else on a record came in through `extra=`.
_RECORD_ATTRS = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime"}
_SECRET_KEY = re.compile(r"pass(word)?|secret|token|authorization|api[_-]?key|cookie|signing[_-]?key", re.I)
_SCRUBS = [
    # Authorization headers and bearer tokens, wherever they appear in a message.
    (re.compile(r"(?i)\b(authorization[\"']?\s*[:=]\s*[\"']?)(?:bearer\s+|basic\s+)?[^\s\"',;}]+"), r"\1***"),
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1***"),
    # JWTs on their own (three base64url parts, the first two starting with '{"').
    (re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"), "***jwt***"),
    # key=value / "key": "value" pairs whose key names a secret.
    (re.compile(r"(?i)([\"']?\b[\w-]*(?:password|passwd|secret|token|api[_-]?key)[\"']?\s*[:=]\s*[\"']?)[^\s\"',;}&]+"),
     r"\1***"),
    # Credentials inside URLs: scheme://user:password@host
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/\s@]*:)[^@/\s]+@"), r"\1***@"),
]


def scrub(text: str) -> str:
    """Replace anything that looks like a credential in free text with `***`."""
    for pattern, repl in _SCRUBS:
        text = pattern.sub(repl, text)
    return text


def _safe(key: str, value: Any) -> Any:
    if _SECRET_KEY.search(key):
        return "***"
    if isinstance(value, (str, int, float, bool)) or value is None:
        return scrub(value) if isinstance(value, str) else value
    # SecretStr and friends already render masked; everything else as a scrubbed string.
    return scrub(str(value))


# -- our ids ------------------------------------------------------------------


def bind(**ids: Any) -> None:
    """Set our ids (task_id, subtask_id, user_id) for the rest of this context; None clears one."""
    for name, value in ids.items():
        _ids[name].set(str(value) if value is not None else None)


def clear() -> None:
    for var in _ids.values():
        var.set(None)


def current_ids() -> dict[str, str]:
    out = {name: var.get() for name, var in _ids.items()}
    if out["user_id"] is None:
        out["user_id"] = _request_user_id()
    return {k: v for k, v in out.items() if v}


@contextmanager
def bound(**ids: Any) -> Iterator[None]:
    tokens = {name: _ids[name].set(str(v) if v is not None else None) for name, v in ids.items()}
    try:
        yield
    finally:
        for name, token in tokens.items():
            _ids[name].reset(token)


def _request_user_id() -> str | None:
    """The authenticated user of the current Flask request, if any (JWT subject)."""
    if "flask" not in sys.modules:
        return None
    from flask import g, has_request_context

    if not has_request_context():
        return None
    jwt = g.get("_jwt_extended_jwt")  # set by flask-jwt-extended once the token verified
    sub = jwt.get("sub") if isinstance(jwt, dict) else None
    return str(sub) if sub else None


def _trace_ids() -> dict[str, str]:
    if "opentelemetry.trace" not in sys.modules:
        return {}
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}


# -- formatters ----------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per record; ids from the context, extras kept, secrets scrubbed."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": scrub(record.getMessage()),
        }
        doc.update(_trace_ids())
        doc.update(current_ids())
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_") and key not in doc:
                doc[key] = _safe(key, value)
        doc["process"] = record.processName if record.processName != "MainProcess" else record.process
        if record.exc_info:
            doc["exc"] = scrub(self.formatException(record.exc_info))
        elif record.exc_text:
            doc["exc"] = scrub(record.exc_text)
        if record.stack_info:
            doc["stack"] = scrub(self.formatStack(record.stack_info))
        return json.dumps(doc, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Human-readable lines for development (MARKETPLACE_LOG_JSON=false), still scrubbed."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s [%(name)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = scrub(super().format(record))
        ids = {**current_ids(), **{k: v for k, v in _trace_ids().items() if k == "trace_id"}}
        return line + (" " + " ".join(f"{k}={v}" for k, v in ids.items()) if ids else "")


def formatter(json_lines: bool | None = None) -> logging.Formatter:
    if json_lines is None:
        from marketplace.settings import get_settings

        json_lines = get_settings().log_json
    return JsonFormatter() if json_lines else TextFormatter()


def setup_logging(*, json_lines: bool | None = None, level: str | int | None = None,
                  stream: IO[str] | None = None) -> None:
    """Make the root logger write scrubbed lines to stdout; called once at a process entry point."""
    from marketplace.settings import get_settings

    settings = get_settings()
    handler = logging.StreamHandler(stream or sys.__stdout__ or sys.stdout)
    handler.setFormatter(formatter(json_lines))
    handler._marketplace = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level or settings.log_level.upper())
    # Libraries that would otherwise print their own way or flood at INFO.
    for name in ("celery.redirected",):
        logging.getLogger(name).handlers = []
    logging.captureWarnings(True)


def dict_config() -> dict[str, Any]:
    """`logging.config.dictConfig` for gunicorn (`logconfig_dict`): its error and access logs go to root."""
    from marketplace.settings import get_settings

    settings = get_settings()
    klass = "JsonFormatter" if settings.log_json else "TextFormatter"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"marketplace": {"()": f"{__name__}.{klass}"}},
        "handlers": {
            "stdout": {"class": "logging.StreamHandler", "formatter": "marketplace", "stream": "ext://sys.stdout"},
        },
        "root": {"level": settings.log_level.upper(), "handlers": ["stdout"]},
        "loggers": {
            "gunicorn.error": {"level": settings.log_level.upper(), "handlers": [], "propagate": True},
            "gunicorn.access": {"level": "INFO", "handlers": [], "propagate": True},
        },
    }

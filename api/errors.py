"""Every error is application/problem+json (RFC 9457); never an HTML page or a stack trace."""
from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, json, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from marketplace.infra.errors import InvalidInput, MarketplaceError, QuotaExceeded, unavailable_dependency

logger = logging.getLogger(__name__)
PROBLEM = "application/problem+json"


def problem(status: int, title: str, detail: str, **extra: Any) -> Response:
    reserved = {"type", "title", "status", "detail"}
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail,
            **{k: v for k, v in extra.items() if k not in reserved}}
    resp = Response(json.dumps(body), status=status, mimetype=PROBLEM)
    return resp


def register_error_handlers(app: Flask) -> None:
    @app.before_request
    def _body_size() -> None:
        # Refuse a declared oversize body before anything reads it (413 even on routes without a body).
        limit = app.config.get("MAX_CONTENT_LENGTH")
        if limit and request.content_length is not None and request.content_length > limit:
            raise RequestEntityTooLarge(f"the request body exceeds {limit} bytes")

    @app.errorhandler(MarketplaceError)
    def _domain(exc: MarketplaceError) -> Response:
        extra = dict(exc.extra)
        if isinstance(exc, InvalidInput):
            extra["errors"] = exc.errors
        resp = problem(exc.status, exc.title, exc.detail, **extra)
        if exc.status == 401:
            resp.headers["WWW-Authenticate"] = "Bearer"
        if isinstance(exc, QuotaExceeded):
            resp.headers["Retry-After"] = str(exc.retry_after)
        return resp

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        status = exc.code or 500
        resp = problem(status, exc.name, exc.description or exc.name)
        if status == 429 and getattr(exc, "retry_after", None) is not None:
            resp.headers["Retry-After"] = str(exc.retry_after)
        for key, value in (exc.get_headers() if hasattr(exc, "get_headers") else []):
            if key.lower() in ("retry-after", "allow"):
                resp.headers[key] = value
        return resp

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        dependency = unavailable_dependency(exc)
        if dependency:
            logger.warning("%s unavailable: %s", dependency, exc)
            resp = problem(503, "Service unavailable", f"the {dependency} is unavailable; try again shortly")
            resp.headers["Retry-After"] = "5"
            return resp
        logger.exception("unhandled error")
        return problem(500, "Internal server error", "an unexpected error occurred; it has been logged")

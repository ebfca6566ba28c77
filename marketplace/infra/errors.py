"""Domain errors. REST maps them to problem+json, gRPC to status codes, in one table each."""
from __future__ import annotations

from typing import Any


class MarketplaceError(Exception):
    """Base: `title` is short and stable, `detail` says what exactly went wrong."""

    status = 400
    title = "Bad request"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class InvalidInput(MarketplaceError):
    """A field or rule of the request failed; `errors` lists each as {field, message}."""

    status = 422
    title = "Validation failed"

    def __init__(self, detail: str, errors: list[dict[str, Any]] | None = None, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.errors = errors or []

    @classmethod
    def field(cls, field: str, message: str) -> InvalidInput:
        return cls(f"{field}: {message}", errors=[{"field": field, "message": message}])


class NotFound(MarketplaceError):
    status = 404
    title = "Not found"


class Conflict(MarketplaceError):
    status = 409
    title = "Conflict"


class Unauthenticated(MarketplaceError):
    status = 401
    title = "Unauthorized"


class PermissionDenied(MarketplaceError):
    status = 403
    title = "Forbidden"


class PaymentRequired(MarketplaceError):
    status = 402
    title = "Insufficient balance"


class QuotaExceeded(MarketplaceError):
    status = 429
    title = "Quota exceeded"
    retry_after = 10  # seconds (Retry-After, gRPC `retry-after`): a quota frees up as tasks finish; a hint


class RateLimited(QuotaExceeded):
    """A rate limit ran out (`marketplace.infra.ratelimit`): `retry_after` is when its window resets."""

    title = "Too many requests"

    def __init__(self, detail: str, *, retry_after: int, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.retry_after = retry_after


class Unavailable(MarketplaceError):
    status = 503
    title = "Service unavailable"


def database_unavailable(exc: BaseException) -> bool:
    """The database is down or the connection died with it (a crash can surface as a plain
    DatabaseError, "server closed the connection unexpectedly", not an OperationalError), or
    this process's pool had no connection to give within `pool_timeout` (every one busy: the
    database is too slow to answer now, which a client should retry like an outage, not a 500)."""
    from sqlalchemy.exc import DBAPIError, OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    return (isinstance(exc, OperationalError | PoolTimeout)
            or (isinstance(exc, DBAPIError) and exc.connection_invalidated))


def unavailable_dependency(exc: BaseException) -> str | None:
    """Name the backing service when `exc` means it is down (REST answers 503, gRPC UNAVAILABLE)."""
    import redis
    from kombu.exceptions import OperationalError as KombuOperationalError

    from marketplace.infra.storage import StorageError

    if database_unavailable(exc):
        return "database"
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return "redis"
    if isinstance(exc, KombuOperationalError):
        return "broker"
    if isinstance(exc, StorageError):
        return "object store"
    return None


def broker_unavailable(exc: BaseException) -> bool:
    """A publish failed because Redis, the broker, is down: what a step whose own work is
    committed may leave to recovery rather than fail on."""
    return unavailable_dependency(exc) in ("redis", "broker")

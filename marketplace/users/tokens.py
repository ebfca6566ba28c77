"""The access-token blocklist in Redis, shared by REST logout and every transport that checks tokens."""
from __future__ import annotations

BLOCKLIST_PREFIX = "marketplace:jwt:revoked:"


def revoke(jti: str, *, ttl_seconds: int) -> None:
    """Refuse the token `jti` for `ttl_seconds` (until it would have expired anyway)."""
    from marketplace.redis_client import get_redis

    if ttl_seconds > 0:
        get_redis().set(BLOCKLIST_PREFIX + jti, "1", ex=ttl_seconds)


def is_revoked(jti: str) -> bool:
    from marketplace.redis_client import get_redis

    return bool(get_redis().exists(BLOCKLIST_PREFIX + jti))

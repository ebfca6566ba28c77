"""Webhook signatures that carry their time, so a captured delivery cannot be replayed later.

Each delivery has the header

    Marketplace-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + raw body>

keyed by the task owner's `webhook_secret` (`GET /v1/me`). A receiver recomputes the HMAC over
the timestamp it was given and the raw body, compares in constant time, and refuses a
timestamp further than its tolerance (5 minutes) from its own clock: the body cannot be
changed, and the header cannot be moved to another time or another body. A receiver that
also remembers the `X-Marketplace-Delivery` ids it has processed is safe within the window too.

Receivers can use `verify` (standard library only: `from marketplace.webhooks.signing import
verify`). The older header `X-Marketplace-Signature: sha256=<HMAC of the body>` is still sent
but deprecated: it has no time, so whoever captured one delivery can replay it forever.
"""
from __future__ import annotations

import hashlib
import hmac
import time

HEADER = "Marketplace-Signature"
LEGACY_HEADER = "X-Marketplace-Signature"  # deprecated: no timestamp
TOLERANCE_S = 300


class SignatureError(ValueError):
    """The signature header is missing, malformed, stale or does not match; the message says which."""


def _mac(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, *, timestamp: int | None = None) -> str:
    """The `Marketplace-Signature` value for `body` sent now (or at `timestamp`)."""
    t = int(time.time()) if timestamp is None else int(timestamp)
    return f"t={t},v1={_mac(secret, t, body)}"


def check(secret: str, body: bytes, header: str | None, *, tolerance_s: float = TOLERANCE_S,
          now: float | None = None) -> int:
    """Raise SignatureError unless `header` signs `body` with `secret` within `tolerance_s` of
    `now`; return the signed timestamp."""
    if not header:
        raise SignatureError(f"no {HEADER} header")
    timestamp: int | None = None
    macs: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                raise SignatureError("the timestamp is not an integer") from None
        elif key == "v1":
            macs.append(value)
    if timestamp is None or not macs:
        raise SignatureError(f"{HEADER} needs t= and v1=")
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        raise SignatureError(f"the timestamp is {current - timestamp:+.0f}s from now (tolerance {tolerance_s:g}s)")
    expected = _mac(secret, timestamp, body)
    # Several v1 values: the sender may sign with an old and a new secret while one is rotated.
    if not any(hmac.compare_digest(expected, mac) for mac in macs):
        raise SignatureError("no v1 signature matches the body")
    return timestamp


def verify(secret: str, body: bytes, header: str | None, *, tolerance_s: float = TOLERANCE_S,
           now: float | None = None) -> bool:
    """What a receiver does with a delivery: True only for the raw `body` as signed, recently."""
    try:
        check(secret, body, header, tolerance_s=tolerance_s, now=now)
    except SignatureError:
        return False
    return True


def legacy_sign(secret: str, body: bytes) -> str:
    """Deprecated `X-Marketplace-Signature` value: the body's HMAC without a time (replayable)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def legacy_verify(secret: str, body: bytes, header: str) -> bool:
    """Deprecated: checks `X-Marketplace-Signature`, which a captured delivery replays forever."""
    return hmac.compare_digest(legacy_sign(secret, body), header or "")

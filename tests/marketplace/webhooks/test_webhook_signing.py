"""The timestamped webhook signature, as a receiver checks it (values worked out by hand)."""
from __future__ import annotations

import hashlib
import hmac

import pytest

from marketplace.webhooks.signing import SignatureError, check, sign, verify

SECRET = "whsec-test"
BODY = b'{"id":"t1","status":"Done"}'
T = 1_800_000_000


def test_the_header_is_the_hmac_of_timestamp_dot_body() -> None:
    mac = hmac.new(b"whsec-test", b'1800000000.{"id":"t1","status":"Done"}', hashlib.sha256).hexdigest()
    assert sign(SECRET, BODY, timestamp=T) == f"t=1800000000,v1={mac}"


def test_a_fresh_delivery_verifies_within_five_minutes_either_way() -> None:
    header = sign(SECRET, BODY, timestamp=T)
    assert check(SECRET, BODY, header, now=T + 299) == T
    assert verify(SECRET, BODY, header, now=T - 299)  # a receiver's clock a little behind


@pytest.mark.parametrize(
    ("body", "header", "now", "reason"),
    [
        (BODY, sign(SECRET, BODY, timestamp=T), T + 301, "tolerance 300s"),  # replayed later
        (BODY + b" ", sign(SECRET, BODY, timestamp=T), T, "no v1 signature matches"),  # altered body
        (BODY, sign("another", BODY, timestamp=T), T, "no v1 signature matches"),  # another secret
        # A captured MAC under a fresh timestamp: the timestamp is signed too.
        (BODY, f"t={T + 600},v1=" + sign(SECRET, BODY, timestamp=T).split("v1=")[1], T + 600,
         "no v1 signature matches"),
        (BODY, "", T, "no Marketplace-Signature header"),
        (BODY, "v1=abc", T, "needs t= and v1="),
        (BODY, "t=soon,v1=abc", T, "not an integer"),
        # The deprecated header's value is not accepted as the new one.
        (BODY, "sha256=" + hmac.new(SECRET.encode(), BODY, hashlib.sha256).hexdigest(), T, "needs t= and v1="),
    ],
)
def test_refused(body: bytes, header: str, now: int, reason: str) -> None:
    with pytest.raises(SignatureError, match=reason):
        check(SECRET, body, header, now=now)
    assert not verify(SECRET, body, header, now=now)


def test_any_of_several_v1_values_may_match() -> None:
    """While a secret is rotated a sender may sign with both."""
    good = sign(SECRET, BODY, timestamp=T).split("v1=")[1]
    assert verify(SECRET, BODY, f"t={T},v1={'0' * 64},v1={good}", now=T)

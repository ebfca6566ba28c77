"""The limits both doors share, with their Redis gone: counting goes on in memory, nothing fails."""
from __future__ import annotations

import pytest

from marketplace.infra.errors import RateLimited, Unauthenticated
from tests.support.servers import free_port


def test_with_redis_down_the_limits_still_hold_in_memory(caplog):  # type: ignore[no-untyped-def]
    from marketplace.infra.ratelimit import RateLimits
    from marketplace.settings import Settings

    limits = RateLimits(Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", signup_rate_limit="2/hour",
                                 login_failure_rate_limit="1/hour", anonymous_rate_limit="3/minute"))
    limits.signup("10.1.2.3")
    limits.signup("10.1.2.3")
    with pytest.raises(RateLimited, match=r"2 per 1 hour \(sign-ups per address\)") as refused:
        limits.signup("10.1.2.3")
    assert refused.value.retry_after > 3500
    assert "counting in memory" in caplog.text

    def wrong() -> None:
        raise Unauthenticated("invalid email or password")

    with pytest.raises(Unauthenticated):
        limits.login("someone@example.com", wrong)
    with pytest.raises(RateLimited, match="failed logins per account"):
        limits.login("SOMEONE@example.com", lambda: "never asked")
    for _ in range(3):
        limits.request("ip:10.1.2.3")
    with pytest.raises(RateLimited, match=r"3 per 1 minute \(requests per address\)"):
        limits.request("ip:10.1.2.3")

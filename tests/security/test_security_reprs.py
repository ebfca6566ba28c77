"""Secrets never in reprs: the passwords inside the URLs that settings hold included."""
from __future__ import annotations

from marketplace.settings import Settings


def test_settings_repr_masks_the_passwords_inside_urls() -> None:
    settings = Settings(redis_url="redis://:r3dis-pw@127.0.0.1:6390/0",
                        database_url="postgresql+psycopg2://mp:pg-pw@db:5432/mp",
                        broker_url="redis://:broker-pw@redis:6379/1", jwt_secret="jwt-secret-value")
    for text in (repr(settings), str(settings)):
        for secret in ("r3dis-pw", "pg-pw", "broker-pw", "jwt-secret-value"):
            assert secret not in text, (secret, text)
        assert "redis_url='redis://:**@127.0.0.1:6390/0'" in text, text
        assert "database_url='postgresql+psycopg2://mp:**@db:5432/mp'" in text, text
    assert settings.redis_url == "redis://:r3dis-pw@127.0.0.1:6390/0"  # only the repr is masked

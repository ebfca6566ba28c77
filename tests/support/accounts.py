"""Accounts made and adjusted directly in the database (real Postgres), for billing and audit tests."""
from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any


def make_admin(client) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    from marketplace.infra.db import session_scope
    from marketplace.users.service import create_user

    email, password = f"admin-{uuid.uuid4().hex[:10]}@example.com", "admin password 123"
    with session_scope() as session:
        user = create_user(session, email=email, password=password, role="admin")
        uid = str(user.id)
    tokens = client.post("/v1/auth/login", json={"email": email, "password": password}).get_json()
    return {"id": uid, "headers": {"Authorization": f"Bearer {tokens['access_token']}"}}


def set_user(user_id: str, **fields: Any) -> None:
    from marketplace.infra.db import session_scope
    from marketplace.users.models import User

    with session_scope() as session:
        user = session.get(User, uuid.UUID(user_id))
        for name, value in fields.items():
            setattr(user, name, value)


def balance_of(user_id: str) -> Decimal:
    from marketplace.infra.db import session_scope
    from marketplace.users.models import User

    with session_scope() as session:
        return session.get(User, uuid.UUID(user_id)).balance

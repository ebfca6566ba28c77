"""Users: registration, authentication, lookup."""
from __future__ import annotations

import secrets
import uuid

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from marketplace.audit import service as audit
from marketplace.infra.errors import Conflict, NotFound, Unauthenticated
from marketplace.users.models import User
from marketplace.users.passwords import hash_password, verify_password

# Verifying against a real hash on unknown emails keeps timing from revealing which exist.
_DUMMY_HASH = hash_password("not-a-real-password")


def normalize_email(email: str) -> str:
    return email.strip().lower()


def create_user(session: Session, *, email: str, password: str, role: str = "user") -> User:
    """Create a user with signup credits; Conflict if the email is taken."""
    from marketplace.billing import service as billing

    email = normalize_email(email)
    if session.scalar(select(User.id).where(User.email == email)) is not None:
        raise Conflict(f"email {email} is already registered", field="email")
    user = User(
        email=email,
        password_hash=hash_password(password),
        role=role,
        webhook_secret=secrets.token_hex(32),
    )
    session.add(user)
    try:
        session.flush()
    except IntegrityError as exc:
        raise Conflict(f"email {email} is already registered", field="email") from exc
    billing.grant_signup_credits(session, user=user)
    audit.append(session, actor=f"user:{user.id}", action="user.registered", subject=f"user:{user.id}", data={"email": email, "role": role, "signup_credits": str(user.balance)})
    return user


def authenticate(session: Session, *, email: str, password: str) -> User:
    user = session.scalar(select(User).where(User.email == normalize_email(email)))
    if user is None:
        verify_password(_DUMMY_HASH, password)
        raise Unauthenticated("invalid email or password")
    if not verify_password(user.password_hash, password):
        audit.record(actor=f"user:{user.id}", action="user.login_failed", subject=f"user:{user.id}", pending=True)
        raise Unauthenticated("invalid email or password")
    audit.record(actor=f"user:{user.id}", action="user.login", subject=f"user:{user.id}")
    return user


def get_user(session: Session, *, user_id: uuid.UUID | str) -> User:
    try:
        uid = uuid.UUID(str(user_id))
    except ValueError as exc:
        raise NotFound("user not found") from exc
    user = session.get(User, uid)
    if user is None:
        raise NotFound("user not found")
    return user


def profile(session: Session, *, user: User) -> dict[str, object]:
    """The caller's own view of their account (`GET /v1/me`)."""
    from marketplace.billing import quotas
    from marketplace.billing.service import available_balance

    return {
        "id": str(user.id),
        "email": user.email,
        "role": user.role,
        "provider": bool(user.provider),
        "balance": str(user.balance),
        "available_balance": str(available_balance(session, user=user)),
        "quotas": quotas.effective_quotas(user),
        "usage": quotas.usage(session, user_id=user.id),
        "webhook_secret": user.webhook_secret,
    }


# What an operator may change on an account (`marketplace users set`); None means the default.
SETTABLE = ("role", "max_active_tasks", "max_items_per_task", "daily_spend_limit", "share", "max_running_subtasks",
            "provider", "min_redundancy")


def update_user(session: Session, *, email: str, actor: str, changes: dict[str, object]) -> User:
    """Change an account's role, fair share or quota overrides, under its row lock, audited as `user.updated`."""
    unknown = set(changes) - set(SETTABLE)
    if unknown:
        raise ValueError(f"not settable: {', '.join(sorted(unknown))}")
    user = session.scalar(select(User).where(User.email == normalize_email(email)).with_for_update()
                          .execution_options(populate_existing=True))
    if user is None:
        raise NotFound(f"no account {normalize_email(email)}", field="email")
    before = {name: getattr(user, name) for name in changes}
    for name, value in changes.items():
        setattr(user, name, value)
    audit.append(session, actor=actor, action="user.updated", subject=f"user:{user.id}",
                 data={name: {"from": _plain(before[name]), "to": _plain(value)} for name, value in changes.items()})
    return user


def _plain(value: object) -> object:
    return None if value is None else value if isinstance(value, int | str | float) else str(value)

"""Users: registration, authentication, lookup."""
from __future__ import annotations

import secrets
import uuid

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from marketplace.errors import Conflict, NotFound, Unauthenticated
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
    return user


def authenticate(session: Session, *, email: str, password: str) -> User:
    user = session.scalar(select(User).where(User.email == normalize_email(email)))
    if user is None:
        verify_password(_DUMMY_HASH, password)
        raise Unauthenticated("invalid email or password")
    if not verify_password(user.password_hash, password):
        raise Unauthenticated("invalid email or password")
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


def count_users(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(User)) or 0

"""Accounts: register and log in."""
from __future__ import annotations

from flask import Blueprint, jsonify

from api.auth import token_pair
from api.db import db
from api.schemas import Credentials, LoginRequest, UserOut
from api.validation import parse_body
from marketplace.users import service as users

bp = Blueprint("auth", __name__, url_prefix="/v1/auth")


@bp.post("/register")
def register():  # type: ignore[no-untyped-def]
    body = parse_body(Credentials)
    session = db()
    user = users.create_user(session, email=body.email, password=body.password)
    session.commit()
    return jsonify(UserOut(id=str(user.id), email=user.email).model_dump()), 201


@bp.post("/login")
def login():  # type: ignore[no-untyped-def]
    body = parse_body(LoginRequest)
    user = users.authenticate(db(), email=body.email, password=body.password)
    return jsonify(token_pair(user)), 200

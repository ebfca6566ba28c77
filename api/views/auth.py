"""Accounts: register, log in, refresh, log out, and the caller's own profile."""
from __future__ import annotations

from flask import Blueprint, Response, jsonify
from flask_jwt_extended import get_jwt, jwt_required

from api.auth import access_token, me, revoke_token, token_pair
from api.db import db
from api.limits import client_address, rate_limits
from api.openapi import api_doc
from api.schemas import AccessToken, LoginRequest, MeOut, TokenPair, UserOut
from api.validation import parse_body
from marketplace.users import service as users
from marketplace.users.schemas import Credentials

bp = Blueprint("auth", __name__, url_prefix="/v1/auth")
me_bp = Blueprint("me", __name__, url_prefix="/v1")


@bp.post("/register")
@api_doc(summary="Create an account", request=Credentials, responses={201: UserOut}, auth=False, tags=["accounts"],
         description="Sign-ups are limited per address (MARKETPLACE_SIGNUP_RATE_LIMIT, default 5/hour, REST and "
                     "gRPC together): over it, 429 naming the limit, with Retry-After.")
def register():  # type: ignore[no-untyped-def]
    body = parse_body(Credentials)
    rate_limits().signup(client_address())
    session = db()
    user = users.create_user(session, email=body.email, password=body.password)
    session.commit()
    return jsonify(UserOut(id=str(user.id), email=user.email).model_dump()), 201


@bp.post("/login")
@api_doc(summary="Log in: an access and a refresh token", request=LoginRequest, responses={200: TokenPair},
         auth=False, tags=["accounts"],
         description="Failed logins are limited per account (MARKETPLACE_LOGIN_FAILURE_RATE_LIMIT, default 20/hour, "
                     "REST and gRPC together): once spent, every login to the account is 429 until the window ends.")
def login():  # type: ignore[no-untyped-def]
    body = parse_body(LoginRequest)
    user = rate_limits().login(body.email, lambda: users.authenticate(db(), email=body.email, password=body.password))
    return jsonify(token_pair(user)), 200


@bp.post("/refresh")
@api_doc(summary="A new access token for a refresh token (sent as the Bearer token)",
         responses={200: AccessToken}, tags=["accounts"])
@jwt_required(refresh=True)
def refresh():  # type: ignore[no-untyped-def]
    user = me()
    return jsonify(access_token(str(user.id), user.role, get_jwt().get("sid"))), 200


@bp.post("/logout")
@api_doc(summary="Log out: the Bearer token (access or refresh) and every token of its login are refused afterwards",
         responses={204: None}, tags=["accounts"])
@jwt_required(verify_type=False)
def logout():  # type: ignore[no-untyped-def]
    revoke_token(get_jwt())
    return Response(status=204)


@me_bp.get("/me")
@api_doc(summary="The caller: role, balance, quotas, usage, webhook secret", responses={200: MeOut},
         tags=["accounts"])
@jwt_required()
def profile():  # type: ignore[no-untyped-def]
    from marketplace.users.service import profile as build_profile

    return jsonify(build_profile(db(), user=me()))

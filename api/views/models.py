"""The model catalog with live capacity: `GET /v1/models`."""
from __future__ import annotations

from flask import Blueprint, jsonify
from flask_jwt_extended import jwt_required

from api.auth import me
from marketplace.infra.errors import NotFound
from marketplace.registry import service as registry

bp = Blueprint("models", __name__, url_prefix="/v1/models")


@bp.get("")
@jwt_required()
def list_models():  # type: ignore[no-untyped-def]
    from marketplace.infra.redis_client import get_redis

    me()
    return jsonify({"models": registry.catalog_entries(r=get_redis())})


@bp.get("/<name>")
@jwt_required()
def get_model(name: str):  # type: ignore[no-untyped-def]
    from marketplace.infra.redis_client import get_redis

    me()
    for entry in registry.catalog_entries(r=get_redis()):
        if entry["name"] == name:
            return jsonify(entry)
    raise NotFound(f"model {name} not found")

"""Compute nodes: `GET /v1/workers`."""
from __future__ import annotations

from flask import Blueprint, jsonify, request
from flask_jwt_extended import jwt_required

from api.auth import me
from api.db import db
from marketplace.registry import service as registry

bp = Blueprint("workers", __name__, url_prefix="/v1/workers")


@bp.get("")
@jwt_required()
def list_workers():  # type: ignore[no-untyped-def]
    """Live nodes plus nodes that went offline within the last day (`?status=online` for live only)."""
    from marketplace.redis_client import get_redis

    me()
    only_online = request.args.get("status") == "online"
    nodes = registry.list_workers(db(), r=get_redis(), include_offline=not only_online)
    return jsonify({"workers": nodes})

"""Compute nodes: `GET /v1/workers`."""
from __future__ import annotations

from typing import Literal

from flask import Blueprint, jsonify
from flask_jwt_extended import jwt_required
from pydantic import BaseModel, ConfigDict, Field

from api.auth import me
from api.db import db
from api.openapi import api_doc
from api.validation import parse_query
from marketplace.registry import service as registry

bp = Blueprint("workers", __name__, url_prefix="/v1/workers")


class WorkerQuery(BaseModel):
    """The filters gRPC `ListWorkers` has."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["online", "offline"] | None = Field(default=None, description=(
        "Only nodes with this status (offline: those that left within the last day)."))
    queue: str | None = Field(default=None, max_length=128, description="Only nodes that consume this queue.")


@bp.get("")
@api_doc(summary="Compute nodes: live ones, and those that went offline within the last day", query=WorkerQuery,
         tags=["workers"], description=(
             "Each node: hostname, queues, models, status, capacity, running, free, last_heartbeat "
             "(deregistered_at once offline), `unavailable`, the models it refuses, and for a provider's "
             "enrolled node `provider` (the provider's user id) and `node` (its name; null for the operator's "
             "own nodes). Admins also see `provider_email`, "
             "`facts` (platform, CPUs, memory, GPUs) and why each model is refused; for other users "
             f"every reason reads {registry.REFUSED_FOR_USERS!r}."))
@jwt_required()
def list_workers():  # type: ignore[no-untyped-def]
    from marketplace.infra.redis_client import get_redis

    q = parse_query(WorkerQuery)
    return jsonify({"workers": registry.list_workers(db(), r=get_redis(), viewer=me(), status=q.status,
                                                     queue=q.queue)})

"""Providers: their compute nodes (enroll, list, disable, rotate) and their earnings."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify
from flask_jwt_extended import jwt_required
from pydantic import BaseModel, ConfigDict, Field

from api.auth import me
from api.db import db
from api.openapi import api_doc
from api.validation import parse_body
from marketplace.providers import service as providers

bp = Blueprint("providers", __name__, url_prefix="/v1/providers")


class EnrollRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=63, description="lowercase letters, digits and '-'; unique")
    queues: list[str] | None = Field(default=None, description="compute queues it consumes (default: every one)")


class NodeOut(BaseModel):
    id: str
    name: str
    hostname: str = Field(description="its name in GET /v1/workers and on its subtasks")
    queues: list[str]
    public_key: str = Field(description="base64 of its Ed25519 public key: its parts are signed with it")
    enabled: bool
    created_at: str
    rotated_at: str | None
    disabled_at: str | None


class CredentialOut(BaseModel):
    node: NodeOut
    credential: dict[str, Any] = Field(description=(
        "Shown once: node_id, name, grpc_address, api_url, node_secret, private_key (Ed25519), broker_url. "
        "The node starts from it alone: `marketplace worker --credentials FILE -Q <queues>`."))


class ListedNodeOut(NodeOut):
    online: bool = Field(description="its heartbeat is current (it appears in GET /v1/workers)")


class NodesOut(BaseModel):
    nodes: list[ListedNodeOut]


class EarningsOut(BaseModel):
    total: str
    share: str = Field(description="MARKETPLACE_PROVIDER_SHARE: a provider's part of each settled charge")
    by_node: list[dict[str, str]]
    by_day: list[dict[str, str]]
    by_node_and_day: list[dict[str, Any]]


@bp.post("/nodes")
@api_doc(summary="Enroll a compute node (the provider role): its credential, shown once", request=EnrollRequest,
         responses={201: CredentialOut}, tags=["providers"])
@jwt_required()
def enroll():  # type: ignore[no-untyped-def]
    body = parse_body(EnrollRequest)
    session = db()
    node, credential = providers.enroll(session, provider=me(), name=body.name, queues=body.queues)
    session.commit()
    return jsonify({"node": providers.node_document(node), "credential": credential}), 201


@bp.get("/nodes")
@api_doc(summary="Your compute nodes", responses={200: NodesOut}, tags=["providers"])
@jwt_required()
def list_nodes():  # type: ignore[no-untyped-def]
    return jsonify({"nodes": providers.list_nodes(db(), provider=me())})


@bp.post("/nodes/<name>/disable")
@api_doc(summary="Disable a node: its calls and parts are refused, its broker user removed",
         responses={200: NodeOut}, tags=["providers"])
@jwt_required()
def disable(name: str):  # type: ignore[no-untyped-def]
    session = db()
    node = providers.disable(session, provider=me(), name=name)
    session.commit()
    return jsonify(providers.node_document(node))


@bp.post("/nodes/<name>/rotate")
@api_doc(summary="A new credential for a node (secret, key, broker password); the old one is refused",
         responses={200: CredentialOut}, tags=["providers"])
@jwt_required()
def rotate(name: str):  # type: ignore[no-untyped-def]
    session = db()
    node, credential = providers.rotate(session, provider=me(), name=name)
    session.commit()
    return jsonify({"node": providers.node_document(node), "credential": credential})


@bp.get("/earnings")
@api_doc(summary="Your earnings as a provider: in all, per node and per UTC day", responses={200: EarningsOut},
         tags=["providers"])
@jwt_required()
def earnings():  # type: ignore[no-untyped-def]
    return jsonify(providers.earnings(db(), provider=me()))

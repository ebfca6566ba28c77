"""WorkerService over gRPC: a thin adapter over `marketplace.registry.service`."""
from __future__ import annotations

import json
import time
from typing import Any

from marketplace.catalog import CONTROL_QUEUES, get_catalog
from marketplace.infra import errors
from marketplace.pb.worker import worker_pb2, worker_pb2_grpc
from marketplace.registry import service as registry
from marketplace.rpc.calls import Call, message, rpc, timestamp
from marketplace.settings import get_settings


def _redis() -> Any:
    from marketplace.infra.redis_client import get_redis

    return get_redis()


def facts_message(facts: dict[str, Any]) -> worker_pb2.WorkerFacts:
    gpus = facts.get("gpus") or []
    first = gpus[0] if gpus else {}
    return worker_pb2.WorkerFacts(
        cpu_count=int(facts.get("cpu_count") or 0), memory_bytes=int(facts.get("memory_bytes") or 0),
        gpu_name=facts.get("gpu_name") or first.get("name") or "",
        gpu_memory_bytes=int(facts.get("gpu_memory_bytes") or first.get("memory_bytes") or 0),
    )


def facts_dict(facts: worker_pb2.WorkerFacts) -> dict[str, Any]:
    out: dict[str, Any] = {"cpu_count": facts.cpu_count or None, "memory_bytes": facts.memory_bytes or None}
    if facts.gpu_name:
        out["gpus"] = [{"name": facts.gpu_name, "memory_bytes": facts.gpu_memory_bytes or None}]
        out["gpu_count"] = 1
    return out


def worker_message(doc: dict[str, Any]) -> worker_pb2.Worker:
    """A `list_workers` document (or a live heartbeat record) as a Worker message."""
    last = doc.get("last_heartbeat")
    return message(
        worker_pb2.Worker,
        hostname=doc["hostname"], queues=list(doc.get("queues") or []), models=list(doc.get("models") or []),
        facts=facts_message(doc["facts"]) if "facts" in doc else None,
        concurrency=int(doc.get("capacity") or doc.get("concurrency") or 0),
        status=doc.get("status") or "online", running=int(doc.get("running") or 0),
        last_heartbeat=timestamp(last),
        registered_at=timestamp(doc.get("registered_at") or doc.get("started_at")),
        provider=doc.get("provider"), node=doc.get("node"),
        reputation=worker_pb2.Reputation(**doc["reputation"]) if doc.get("reputation") else None,
    )


def _ttl() -> int:
    return int(get_settings().heartbeat_ttl)


def _live_record(hostname: str) -> dict[str, Any] | None:
    return next((w for w in registry.live_workers(_redis()) if w.get("hostname") == hostname), None)


def node_message(doc: dict[str, Any]) -> worker_pb2.Node:
    """A `providers.node_document` as a Node message (`online` where the document has it: a listing)."""
    return message(worker_pb2.Node, id=doc["id"], name=doc["name"], hostname=doc["hostname"], queues=doc["queues"],
                   public_key=doc["public_key"], enabled=doc["enabled"], created_at=timestamp(doc["created_at"]),
                   rotated_at=timestamp(doc["rotated_at"]), disabled_at=timestamp(doc["disabled_at"]),
                   online=bool(doc.get("online")))


def _credential_reply(cls: Any, node: Any, credential: dict[str, Any]) -> Any:
    from marketplace.providers import service as providers

    return cls(node=node_message(providers.node_document(node)), credential_json=json.dumps(credential))


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    # -- a provider's nodes (the same service functions as REST /v1/providers/nodes) --
    @rpc()
    def EnrollNode(self, request: worker_pb2.EnrollNodeRequest, call: Call) -> worker_pb2.EnrollNodeResponse:
        from marketplace.providers import service as providers

        node, credential = providers.enroll(call.session, provider=call.me, name=request.name,
                                            queues=list(request.queues) or None)
        call.session.commit()
        return _credential_reply(worker_pb2.EnrollNodeResponse, node, credential)

    @rpc()
    def ListNodes(self, request: worker_pb2.ListNodesRequest, call: Call) -> worker_pb2.ListNodesResponse:
        from marketplace.providers import service as providers

        return worker_pb2.ListNodesResponse(nodes=[node_message(d) for d in
                                                   providers.list_nodes(call.session, provider=call.me)])

    @rpc()
    def DisableNode(self, request: worker_pb2.DisableNodeRequest, call: Call) -> worker_pb2.DisableNodeResponse:
        from marketplace.providers import service as providers

        node = providers.disable(call.session, provider=call.me, name=request.name)
        call.session.commit()
        return worker_pb2.DisableNodeResponse(node=node_message(providers.node_document(node)))

    @rpc()
    def RotateNode(self, request: worker_pb2.RotateNodeRequest, call: Call) -> worker_pb2.RotateNodeResponse:
        from marketplace.providers import service as providers

        node, credential = providers.rotate(call.session, provider=call.me, name=request.name)
        call.session.commit()
        return _credential_reply(worker_pb2.RotateNodeResponse, node, credential)

    @rpc()
    def Register(self, request: worker_pb2.RegisterRequest, call: Call) -> worker_pb2.RegisterResponse:
        call.admin()
        if not request.hostname:
            raise errors.InvalidInput.field("hostname", "required")
        if not request.queues:
            raise errors.InvalidInput.field("queues", "at least one queue")
        # As a node's own registration: the catalog's queues and models only (a made-up queue
        # showed as capacity no task could ever use).
        catalog = get_catalog()
        unknown = [q for q in request.queues if q not in catalog.queues and q not in CONTROL_QUEUES]
        if unknown:
            raise errors.InvalidInput.field("queues", f"unknown queue(s): {', '.join(unknown)}")
        served = {m for q in request.queues for m in catalog.models_for_queue(q)}
        stray = [m for m in request.models if m not in served]
        if stray:
            raise errors.InvalidInput.field("models", f"not served by these queues: {', '.join(stray)}")
        info = {
            "hostname": request.hostname, "queues": sorted(request.queues), "models": sorted(request.models),
            "concurrency": request.concurrency or 1, "facts": facts_dict(request.facts), "unavailable": {},
            "started_at": time.time(), "running": 0,
        }
        registry.record_online(call.session, info=info)
        call.session.commit()
        registry.heartbeat(_redis(), info=info)
        return worker_pb2.RegisterResponse(worker=worker_message(_live_record(request.hostname) or info),
                                           heartbeat_ttl_seconds=_ttl())

    @rpc()
    def Heartbeat(self, request: worker_pb2.HeartbeatRequest, call: Call) -> worker_pb2.HeartbeatResponse:
        call.admin()
        record = _live_record(request.hostname)
        if record is None:
            raise errors.NotFound(f"worker {request.hostname!r} is not registered (or its heartbeat expired); "
                                  "register again")
        registry.heartbeat(_redis(), info={**record, "running": request.running})
        return worker_pb2.HeartbeatResponse(worker=worker_message(_live_record(request.hostname) or record),
                                            heartbeat_ttl_seconds=_ttl())

    @rpc()
    def ListWorkers(self, request: worker_pb2.ListWorkersRequest, call: Call) -> worker_pb2.ListWorkersResponse:
        if request.status and request.status not in ("online", "offline"):
            raise errors.InvalidInput.field("status", "online or offline")
        # Any user; a node's facts are an admin's only (registry.node_view): a user's have none.
        docs = registry.list_workers(call.session, r=_redis(), viewer=call.me, status=request.status or None,
                                     queue=request.queue or None)
        return worker_pb2.ListWorkersResponse(workers=[worker_message(d) for d in docs])

    @rpc()
    def Capabilities(self, request: worker_pb2.CapabilitiesRequest, call: Call) -> worker_pb2.CapabilitiesResponse:
        call.me  # noqa: B018
        entries = registry.catalog_entries(r=_redis())
        if request.model and request.model not in {e["name"] for e in entries}:
            raise errors.InvalidInput.field("model", f"unknown model {request.model!r}")
        if request.device and request.device not in ("cpu", "gpu"):
            raise errors.InvalidInput.field("device", "cpu or gpu")
        out = []
        for entry in entries:
            for device, queue in zip(entry["devices"], entry["queues"], strict=True):
                if (request.model and entry["name"] != request.model) or (request.device and device != request.device):
                    continue
                out.append(worker_pb2.Capability(model=entry["name"], device=device, queue=queue,
                                                 live_workers=int(entry["live_workers"].get(queue, 0))))
        return worker_pb2.CapabilitiesResponse(capabilities=out)

"""NodeService over gRPC: a credentialed node's claim, part, outcome, heartbeat and stop check.

Authenticated by the node's credential (metadata `x-node-id`, `x-node-secret`), not a user's
token; a disabled node is PERMISSION_DENIED. A thin adapter over `marketplace.providers.work`."""
from __future__ import annotations

import json
import threading
import time

from marketplace.infra import errors
from marketplace.pb.worker import worker_pb2, worker_pb2_grpc
from marketplace.providers import service as providers
from marketplace.providers import work
from marketplace.rpc.calls import Call, parse_json, rpc
from marketplace.settings import get_settings

# A node makes two calls a subtask: its identity is read once per AUTH_CACHE_S, not per call. So a
# node disabled, or a credential rotated, is refused within that long (its broker user at once).
AUTH_CACHE_S = 2.0
_known: dict[tuple[str, str], tuple[float, providers.NodeIdentity]] = {}
_known_lock = threading.Lock()


def node_of(call: Call, *, fresh: bool = False) -> providers.NodeIdentity:
    """The calling node. `fresh`: read it now, not from the cache (a heartbeat, every few seconds:
    a node disabled a moment ago must not register itself again for AUTH_CACHE_S)."""
    meta = {k.lower(): str(v) for k, v in (call.context.invocation_metadata() or ())}
    if not meta.get("x-node-id") or not meta.get("x-node-secret"):
        raise errors.Unauthenticated("missing node credential: send x-node-id and x-node-secret metadata")
    key = (meta["x-node-id"], meta["x-node-secret"])
    now = time.monotonic()
    with _known_lock:
        hit = _known.get(key)
    if hit is not None and now - hit[0] < AUTH_CACHE_S and not fresh:
        return hit[1]
    try:
        node = providers.authenticate(call.session, node_id=key[0], secret=key[1])
    except (errors.Unauthenticated, errors.PermissionDenied):  # refused now: its other calls too, not only after the cache expires
        with _known_lock:
            _known.pop(key, None)
        raise
    with _known_lock:
        if len(_known) > 10_000:
            _known.clear()
        _known[key] = (now, node)
    return node


class NodeServicer(worker_pb2_grpc.NodeServiceServicer):
    @rpc(auth=False)
    def ClaimSubtask(self, request: worker_pb2.ClaimSubtaskRequest, call: Call) -> worker_pb2.ClaimSubtaskResponse:
        node = node_of(call)
        call.session.close()  # the claim commits by itself; no session held across it
        early, claimed = work.claim(node, subtask_id=request.subtask_id, message_id=request.message_id,
                                    incarnation=request.incarnation)
        if claimed is None:
            return worker_pb2.ClaimSubtaskResponse(run=False, outcome_json=json.dumps(early or {}, default=str))
        return worker_pb2.ClaimSubtaskResponse(run=True, work_json=work.work_json(claimed),
                                               ticket=work.ticket(node, work.sealed_json(claimed)))

    @rpc(auth=False)
    def CompleteSubtask(self, request: worker_pb2.CompleteSubtaskRequest, call: Call) -> worker_pb2.CompleteSubtaskResponse:
        node = node_of(call)
        call.session.close()
        if not request.sha256:
            raise errors.InvalidInput.field("sha256", "required")
        outcome = work.complete(node, subtask_id=request.subtask_id, attempt=request.attempt, output=request.output,
                                sha256=request.sha256, signature=request.signature, seconds=request.seconds,
                                work_doc=request.work_json, seal=request.ticket)
        return worker_pb2.CompleteSubtaskResponse(outcome_json=json.dumps(outcome, default=str))

    @rpc(auth=False)
    def FailSubtask(self, request: worker_pb2.FailSubtaskRequest, call: Call) -> worker_pb2.FailSubtaskResponse:
        node = node_of(call)
        call.session.close()
        if request.kind == "lost":
            if not request.message_id:
                raise errors.InvalidInput.field("message_id", "required for kind lost")
            return worker_pb2.FailSubtaskResponse(outcome_json=json.dumps(work.lost(node, message_id=request.message_id)))
        outcome = work.end(node, subtask_id=request.subtask_id, attempt=request.attempt, kind=request.kind,
                           error=request.error[:2000], seconds=request.seconds, work_doc=request.work_json,
                           seal=request.ticket)
        return worker_pb2.FailSubtaskResponse(outcome_json=json.dumps(outcome, default=str))

    @rpc(auth=False)
    def Heartbeat(self, request: worker_pb2.NodeHeartbeatRequest, call: Call) -> worker_pb2.NodeHeartbeatResponse:
        node = node_of(call, fresh=True)
        call.session.close()
        info = parse_json(request.info_json, field="info_json", default={})
        if not isinstance(info, dict):
            raise errors.InvalidInput.field("info_json", "a JSON object")
        work.heartbeat(node, info=info, leaving=request.leaving)
        return worker_pb2.NodeHeartbeatResponse(hostname=node.hostname,
                                                heartbeat_ttl_seconds=int(get_settings().heartbeat_ttl))

    @rpc(auth=False)
    def CheckStop(self, request: worker_pb2.CheckStopRequest, call: Call) -> worker_pb2.CheckStopResponse:
        node = node_of(call)
        call.session.close()
        return worker_pb2.CheckStopResponse(stop=work.stopped(node, task_id=request.task_id))

"""ResultService over gRPC: a thin adapter over `marketplace.results.service`."""
from __future__ import annotations

import json

from marketplace.infra import errors
from marketplace.pb.result import result_pb2, result_pb2_grpc
from marketplace.results import service as results
from marketplace.rpc.calls import Call, money, rpc
from marketplace.tasks import service as tasks


class ResultServicer(result_pb2_grpc.ResultServiceServicer):
    @rpc()
    def SavePartial(self, request: result_pb2.SavePartialRequest, call: Call) -> result_pb2.SavePartialResponse:
        call.admin()
        task = tasks.get_task(call.session, task_id=request.task_id, user=call.me)
        try:
            outputs = [json.loads(item) for item in request.outputs]
        except ValueError as exc:
            raise errors.InvalidInput.field("outputs", f"each output must be one JSON value: {exc}") from None
        call.session.rollback()  # the part is recorded in its own transactions
        saved = results.save_partial(task_id=str(task.id), index=request.index, outputs=outputs,
                                     error=request.error or None, seconds=request.seconds, worker=request.worker)
        return result_pb2.SavePartialResponse(**saved)

    @rpc()
    def Finalize(self, request: result_pb2.FinalizeRequest, call: Call) -> result_pb2.FinalizeResponse:
        call.admin()
        task = tasks.get_task(call.session, task_id=request.task_id, user=call.me)
        task_id = str(task.id)
        call.session.rollback()  # finalize locks the row in its own transaction
        outcome = results.finalize_task(task_id)
        if outcome == "waiting":
            raise errors.Conflict(f"task {task_id} still has subtasks that are not final")
        task = tasks.get_task(call.session, task_id=task_id)
        return result_pb2.FinalizeResponse(task_id=task_id, status=task.status, result_key=task.result_key or "",
                                           cost=money(task.cost), error=task.error or "")

    @rpc()
    def GetResult(self, request: result_pb2.GetResultRequest, call: Call) -> result_pb2.GetResultResponse:
        task = tasks.get_task(call.session, task_id=request.task_id, user=call.me)
        read = results.read_partial_result if request.partial else results.read_result
        doc = json.loads(read(call.session, task=task))
        return result_pb2.GetResultResponse(
            task_id=doc["task_id"], model=doc["model"],
            outputs=[json.dumps(item, separators=(",", ":"), ensure_ascii=False) for item in doc["outputs"]],
            status=doc.get("status", ""), complete=doc.get("complete", False),
            missing=[result_pb2.MissingPart(**{**m, "error": m["error"] or ""}) for m in doc.get("missing", [])],
        )

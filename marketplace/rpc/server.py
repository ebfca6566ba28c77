"""The gRPC server: all seven services on one port, with health checking and reflection."""
from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc

from marketplace.settings import get_settings

logger = logging.getLogger(__name__)


# -- the server ---------------------------------------------------------------------------------

def _servicers() -> list[tuple[Any, Callable[[Any, grpc.Server], None], str]]:
    from marketplace.pb.audit import audit_pb2, audit_pb2_grpc
    from marketplace.pb.billing import billing_pb2, billing_pb2_grpc
    from marketplace.pb.result import result_pb2, result_pb2_grpc
    from marketplace.pb.scheduler import scheduler_pb2, scheduler_pb2_grpc
    from marketplace.pb.task import task_pb2, task_pb2_grpc
    from marketplace.pb.user import user_pb2, user_pb2_grpc
    from marketplace.pb.worker import worker_pb2, worker_pb2_grpc
    from marketplace.rpc.audit import AuditServicer
    from marketplace.rpc.billing import BillingServicer
    from marketplace.rpc.nodes import NodeServicer
    from marketplace.rpc.registry import WorkerServicer
    from marketplace.rpc.results import ResultServicer
    from marketplace.rpc.scheduling import SchedulerServicer
    from marketplace.rpc.tasks import TaskServicer
    from marketplace.rpc.users import UserServicer

    def name(pb2: Any, service: str) -> str:
        return pb2.DESCRIPTOR.services_by_name[service].full_name

    return [
        (TaskServicer(), task_pb2_grpc.add_TaskServiceServicer_to_server, name(task_pb2, "TaskService")),
        (SchedulerServicer(), scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server,
         name(scheduler_pb2, "SchedulerService")),
        (WorkerServicer(), worker_pb2_grpc.add_WorkerServiceServicer_to_server, name(worker_pb2, "WorkerService")),
        (NodeServicer(), worker_pb2_grpc.add_NodeServiceServicer_to_server, name(worker_pb2, "NodeService")),
        (ResultServicer(), result_pb2_grpc.add_ResultServiceServicer_to_server, name(result_pb2, "ResultService")),
        (BillingServicer(), billing_pb2_grpc.add_BillingServiceServicer_to_server,
         name(billing_pb2, "BillingService")),
        (AuditServicer(), audit_pb2_grpc.add_AuditServiceServicer_to_server, name(audit_pb2, "AuditService")),
        (UserServicer(), user_pb2_grpc.add_UserServiceServicer_to_server, name(user_pb2, "UserService")),
    ]


@dataclass
class GrpcServer:
    server: grpc.Server
    port: int
    health: Any
    service_names: list[str]
    slots: Any = None  # the stream slots (guard.StreamSlots)

    def start(self) -> None:
        from grpc_health.v1 import health_pb2

        self.server.start()
        for svc in ["", *self.service_names]:
            self.health.set(svc, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float | None = 5.0) -> None:
        from grpc_health.v1 import health_pb2

        self.health.enter_graceful_shutdown()
        for svc in ["", *self.service_names]:
            self.health.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.stop(grace).wait()


def build_server(*, host: str = "127.0.0.1", port: int = 50051, max_workers: int = 16) -> GrpcServer:
    """All services, health and reflection on `host:port` (port 0 picks a free one)."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    from marketplace.infra import ratelimit
    from marketplace.rpc.guard import GuardInterceptor, StreamSlots, stream_capacity

    # Rate limits shared with REST, and streams capped below the pool size (marketplace/rpc/guard.py).
    slots = StreamSlots(total=stream_capacity(max_workers), per_caller=lambda: get_settings().grpc_streams_per_user)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        interceptors=[GuardInterceptor(limits=ratelimit.shared(), slots=slots)],
        options=[("grpc.max_receive_message_length", get_settings().max_body_bytes)],
    )
    names = []
    for servicer, add, name in _servicers():
        add(servicer, server)
        names.append(name)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise RuntimeError(f"could not bind the gRPC server to {host}:{port}")
    return GrpcServer(server=server, port=bound, health=health_servicer, service_names=names, slots=slots)


def serve(*, host: str = "127.0.0.1", port: int = 50051, max_workers: int = 16) -> None:
    """Run until SIGINT/SIGTERM; health turns NOT_SERVING first so balancers drain."""
    srv = build_server(host=host, port=port, max_workers=max_workers)
    srv.start()
    logger.info("gRPC listening on %s:%d (%s)", host, srv.port, ", ".join(srv.service_names))
    stopped = threading.Event()

    def _stop(*_: Any) -> None:
        stopped.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    stopped.wait()
    srv.stop()

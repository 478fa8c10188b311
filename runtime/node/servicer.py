"""gRPC transport of a node: Open Inference Protocol and control servicers, health, reflection.

The servicers convert protobuf messages (:mod:`edgesplit.runtime.transport.oip`) to the
data plane's types and delegate; every error is mapped to a gRPC status at one boundary
(:func:`_answer`), so no request kills the node. The server is ``grpc.aio``; decoding,
model execution and encoding happen in the data plane's worker threads.

Example::

    server = await start_node_server(DataPlane(registry), port=0)
    print(server.port)
    await server.stop(grace=5)
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edgesplit.protos import edgesplit_pb2, edgesplit_pb2_grpc, inference_pb2, inference_pb2_grpc
from edgesplit.runtime import codec
from edgesplit.runtime.inference import InferError
from edgesplit.runtime.transport.auth import TokenAuthInterceptor
from edgesplit.runtime.transport.oip import (
    DEFAULT_LIMITS,
    DEFAULT_MAX_MESSAGE_BYTES,
    PUSHBACK_KEY,
    RequestLimits,
    build_infer_response,
    parse_infer_request,
)

from .dataplane import DataPlane
from .registry import shown

SERVER_NAME = "edgesplit"
SERVER_VERSION = "0.2.0"
# Protocol extensions this server implements beyond the core (docs/protocol.md).
EXTENSIONS = ("edgesplit_codec", "edgesplit_batching")
_STATUS = {
    InferError.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    InferError.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    InferError.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    InferError.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    InferError.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    InferError.INTERNAL: grpc.StatusCode.INTERNAL,
    InferError.CANCELLED: grpc.StatusCode.CANCELLED,
}


class InferenceServicer(inference_pb2_grpc.GRPCInferenceServiceServicer):
    """Open Inference Protocol over a :class:`DataPlane`."""

    def __init__(self, plane: DataPlane, ready: bool = True, limits: RequestLimits = DEFAULT_LIMITS) -> None:
        self.plane = plane
        self.ready = ready
        self.limits = limits
        self.draining = False  # set by NodeServer.stop: new inference requests are refused
        # Arrival stamps are seconds since this servicer began, with a token naming its clock:
        # two answers from different nodes (behind one address, say) are not compared, and
        # the host's uptime is not told to every client.
        self.clock_zero = time.perf_counter()
        self.clock_id = secrets.token_hex(8)

    async def ServerLive(self, request, context):
        return inference_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return inference_pb2.ServerReadyResponse(ready=self.ready)

    async def ModelReady(self, request, context):
        try:
            self.plane.resolve(request.name, request.version)
        except InferError:
            return inference_pb2.ModelReadyResponse(ready=False)
        return inference_pb2.ModelReadyResponse(ready=self.ready)

    async def ServerMetadata(self, request, context):
        return inference_pb2.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):
        async def handle():
            model = self.plane.resolve(request.name, request.version)
            T = inference_pb2.ModelMetadataResponse.TensorMetadata
            # The metadata names one datatype per tensor: the native FP32. FP16 and INT8 with
            # codec parameters are accepted too; NodeInfo lists them (docs/protocol.md).
            return inference_pb2.ModelMetadataResponse(
                name=model.name, versions=[model.version], platform=model.platform,
                inputs=[T(name=s.name, datatype=s.datatypes[0], shape=[-1, *s.shape]) for s in model.inputs],
                outputs=[T(name=s.name, datatype=s.datatypes[0], shape=[-1, *s.shape]) for s in model.outputs],
            )
        return await _answer(handle, context)

    async def ModelInfer(self, request, context):
        started = time.perf_counter()
        registry = self.plane.registry
        label = request.model_name if request.model_name in registry else "unknown"
        received = sent = 0  # counted once the request's shape is checked (a loop over it is bounded)

        async def handle():
            nonlocal sent, received
            if self.draining:
                raise InferError(InferError.UNAVAILABLE, "node is shutting down; send to another node")
            self.plane.admit_or_refuse()  # before the request is even converted
            req = parse_infer_request(request, self.limits, context.time_remaining())
            received = sum(inp.nbytes for inp in req.inputs)
            result = await self.plane.infer(req)
            response = build_infer_response(result, request.id, raw=bool(request.raw_input_contents),
                                            arrived_s=started - self.clock_zero, clock_id=self.clock_id)
            sent = sum(len(out.data) for out in result.outputs)
            return response

        code = "OK"
        try:
            response = await _answer(handle, context, inference_pb2.ModelInferResponse)
            code = _code_name(context)
            return response
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except BaseException:
            code = _code_name(context)
            raise
        finally:
            metrics = self.plane.metrics
            if metrics:
                metrics.child("requests", label, code).inc()
                metrics.child("request_seconds", label).observe(time.perf_counter() - started)
                metrics.child("received_bytes", label).inc(received)
                metrics.child("sent_bytes", label).inc(sent)


def _code_name(context) -> str:
    code = context.code()
    if code is None:
        return "OK"
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


async def _answer(handle, context, empty=None):
    """Run a handler; turn every failure into a gRPC status (the one error boundary).

    With ``empty`` (the method's response type), a refusal sets the status and returns an
    empty message instead of raising through gRPC's abort: the cheap path a node takes
    thousands of times a second when it sheds load.
    """
    try:
        return await handle()
    except InferError as exc:
        trailing = ()
        if exc.retry_after_s is not None:  # gRPC's pushback: when a retry is worth it
            trailing = ((PUSHBACK_KEY, str(max(1, round(1000 * exc.retry_after_s)))),)
        if empty is None:
            await context.abort(_STATUS[exc.code], exc.message, trailing_metadata=trailing)
        context.set_code(_STATUS[exc.code])
        context.set_details(exc.message)
        if trailing:
            context.set_trailing_metadata(trailing)
        return empty()
    except grpc.aio.AbortError:
        raise
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # defensive: a bug must answer INTERNAL, not kill the node
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


class ControlServicer(edgesplit_pb2_grpc.EdgeSplitControlServicer):
    """edgesplit.v1 control plane: node identity, served models, codecs and segment profiles."""

    def __init__(self, plane: DataPlane, node_name: str, weights_sha256: str = "", intra_op_threads: int = 0) -> None:
        self.plane = plane
        self.node_name = node_name
        self.weights_sha256 = weights_sha256
        self.intra_op_threads = intra_op_threads

    async def NodeInfo(self, request, context):
        registry = self.plane.registry
        split = next(iter(registry.split_models.values()), None)
        cuts = [
            edgesplit_pb2.CutInfo(index=c.index, name=c.name, shape=list(c.shape), datatype="FP32")
            for c in (split.cut_points() if split else [])
        ]
        models = []
        for m in registry:
            TI = edgesplit_pb2.TensorInfo
            models.append(edgesplit_pb2.ModelInfo(
                name=m.name,
                inputs=[TI(name=s.name, shape=list(s.shape), datatypes=list(s.datatypes), codecs=list(codec.CODECS))
                        for s in m.inputs],
                outputs=[TI(name=s.name, shape=list(s.shape), datatypes=list(s.datatypes)) for s in m.outputs],
                batching=m.batching.enabled, preferred_batch=m.batching.preferred_batch,
                max_batch=m.batching.max_batch, max_queue_delay_seconds=m.batching.max_delay_s,
            ))
        return edgesplit_pb2.NodeInfoResponse(
            node_name=self.node_name, version=SERVER_VERSION, model_name=split.name if split else "",
            weights_sha256=self.weights_sha256, cuts=cuts, codecs=list(codec.CODECS),
            max_inflight=self.plane.max_inflight,
            max_batch=max((m.batching.max_batch for m in registry), default=0),
            served_models=registry.names(), models=models, workers=self.plane.workers,
            intra_op_threads=self.intra_op_threads, graphs=sorted(registry.graphs),
        )

    async def SegmentProfile(self, request, context):
        async def handle():
            registry = self.plane.registry
            names = [self.plane.resolve(request.model_name).name] if request.model_name else registry.names()
            profiles = []
            for name in names:
                stats = registry.get(name).stats
                profiles.append(edgesplit_pb2.SegmentProfile(
                    model_name=name, requests=stats.requests, mean_seconds=stats.mean_compute_seconds,
                    mean_batch=stats.mean_batch, batches=stats.batches,
                    mean_queue_seconds=stats.queue_seconds / stats.requests if stats.requests else 0.0,
                ))
            return edgesplit_pb2.SegmentProfileResponse(profiles=profiles)
        return await _answer(handle, context)


    async def GraphProfile(self, request, context):
        async def handle():
            graphs = self.plane.registry.graphs
            graph = graphs.get(request.graph_name)
            if graph is None:
                served = ", ".join(sorted(graphs)) or "none (start the node with --bundle DIR)"
                raise InferError(InferError.NOT_FOUND,
                                 f"unknown graph {shown(request.graph_name)}; graphs served here: {served}")
            # Minutes of work for a big graph at many repeats: off the event loop, which
            # keeps answering inference and health checks meanwhile.
            text = await asyncio.to_thread(graph.profile, request.repeats or 9, request.batch or 1)
            return edgesplit_pb2.GraphProfileResponse(profile_json=text)
        return await _answer(handle, context)


class _Undecodable:
    """Stands in for a request whose bytes are not a valid protobuf message."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _guard(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """``handler`` with a deserializer that never raises: undecodable bytes answer
    INVALID_ARGUMENT (gRPC itself would say UNKNOWN). Built once per method, not per call."""
    if handler.request_streaming or handler.response_streaming:
        return handler
    deserialize, behaviour = handler.request_deserializer, handler.unary_unary

    def safe_deserialize(data: bytes):
        try:
            return deserialize(data) if deserialize else data
        except Exception as exc:
            return _Undecodable(exc)

    async def guarded(request, context):
        if isinstance(request, _Undecodable):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request to {method} is not a valid protobuf message: {request.error}",
            )
        return await behaviour(request, context)

    return grpc.unary_unary_rpc_method_handler(
        guarded, request_deserializer=safe_deserialize, response_serializer=handler.response_serializer
    )


class _GuardedRegistration:
    """Stands in for the server in a generated ``add_*Servicer_to_server`` call and registers
    each method wrapped by :func:`_guard`. Unlike an interceptor, which gRPC runs in Python
    on every call, the wrapping costs nothing per request."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass  # the same methods arrive guarded through add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        guarded = {name: _guard(f"/{service}/{name}", h) for name, h in handlers.items()}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, guarded),))
        self._server.add_registered_method_handlers(service, guarded)


# Keepalive pings from devices detect dead connections during link outages; allow them.
SERVER_OPTIONS = (
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 500),
    ("grpc.http2.max_ping_strikes", 0),
)


@dataclass
class NodeServer:
    """A started node server and what is needed to stop it gracefully."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    inference: InferenceServicer

    async def stop(self, grace: float = 10.0) -> None:
        """Refuse new inference (UNAVAILABLE, so devices fail over), report NOT_SERVING, let the
        requests in flight finish within ``grace``, then close at once.

        Closing once nothing is in flight, rather than waiting out the grace period, means an
        idle client connection does not hold the exit.
        """
        self.inference.ready = False
        self.inference.draining = True
        await self.health.enter_graceful_shutdown()
        drained = await self.inference.plane.wait_idle(grace)
        # Drained: a moment for the last answers to be written. Not drained: cancel the rest now.
        await self.server.stop(min(0.5, grace) if drained else 0)


async def start_node_server(
    plane: DataPlane,
    host: str = "127.0.0.1",
    port: int = 0,
    node_name: str = "edge-node",
    weights_sha256: str = "",
    intra_op_threads: int = 0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    credentials: grpc.ServerCredentials | None = None,
    token: str | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> NodeServer:
    """Start a grpc.aio server with the data plane, control plane, health and reflection.

    ``credentials`` (see :func:`edgesplit.runtime.transport.tls.server_credentials`) makes the port
    TLS, mutual TLS when they hold a CA. With ``token``, every call but the health service
    must carry ``authorization: Bearer <token>`` (:class:`~edgesplit.runtime.transport.auth.TokenAuthInterceptor`,
    run before ``interceptors``).
    """
    chain: list[grpc.aio.ServerInterceptor] = []
    if token is not None:
        chain.append(TokenAuthInterceptor(token))
    chain.extend(interceptors)
    server = grpc.aio.server(
        interceptors=chain or None,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            *SERVER_OPTIONS,
        ],
    )
    inference = InferenceServicer(plane)
    inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(inference, _GuardedRegistration(server))
    control = ControlServicer(plane, node_name, weights_sha256, intra_op_threads)
    edgesplit_pb2_grpc.add_EdgeSplitControlServicer_to_server(control, _GuardedRegistration(server))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = (
        inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
        edgesplit_pb2.DESCRIPTOR.services_by_name["EdgeSplitControl"].full_name,
        health.SERVICE_NAME,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(services, server)
    bound = await _bind_and_start(server, host, port, credentials)
    for name in ("", *services[:2]):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return NodeServer(server, bound, health_servicer, inference)


async def start_health_server(
    health_servicer: health.aio.HealthServicer,
    host: str = "127.0.0.1",
    port: int = 0,
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Serve only ``grpc.health.v1`` (the node's own health servicer) on a separate address.

    For probes that cannot present the data port's client certificate or token (a kubelet
    gRPC probe): the answer is SERVING or NOT_SERVING and nothing else. Returns the started
    server and its port; stop it after the node server.
    """
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4096)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, await _bind_and_start(server, host, port, credentials)


async def _bind_and_start(
    server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None
) -> int:
    """Bind ``host:port`` (TLS when ``credentials``), start the server, return the bound port."""
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not bind {address}")
    await server.start()
    return bound

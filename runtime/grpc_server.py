"""gRPC transport of a node: Open Inference Protocol and control servicers, health, reflection.

The servicers convert protobuf messages to the data plane's types and delegate; every
error is mapped to a gRPC status at one boundary (:func:`_answer`), so no request kills
the node. The server is ``grpc.aio``; model execution happens in the data plane's worker
threads.

Example::

    server = await start_node_server(DataPlane(model), port=0)
    print(server.port)
    await server.stop(grace=5)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edgesplit.protos import edgesplit_pb2, edgesplit_pb2_grpc, inference_pb2, inference_pb2_grpc

from . import codec
from .auth import TokenAuthInterceptor
from .dataplane import DataPlane, DataPlaneError, InferInput

SERVER_NAME = "edgesplit"
SERVER_VERSION = "0.1.0"
DEFAULT_MAX_MESSAGE_BYTES = 32 * 1024 * 1024
_MAX_DIM = 1 << 31
_STATUS = {
    DataPlaneError.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    DataPlaneError.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    DataPlaneError.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DataPlaneError.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    DataPlaneError.INTERNAL: grpc.StatusCode.INTERNAL,
}


def parameter_value(p: inference_pb2.InferParameter) -> object:
    """The Python value held by an InferParameter (None when unset)."""
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def set_parameter(p: inference_pb2.InferParameter, value: object) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = str(value)


def request_to_inputs(request: inference_pb2.ModelInferRequest) -> list[InferInput]:
    """Convert a ModelInferRequest's tensors (raw or typed contents) to data-plane inputs."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise DataPlaneError(
            DataPlaneError.INVALID_ARGUMENT,
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; give one per input",
        )
    shared = {k: parameter_value(v) for k, v in request.parameters.items()}
    inputs = []
    for i, tensor in enumerate(request.inputs):
        shape = tuple(int(d) for d in tensor.shape)
        if any(d < 0 or d >= _MAX_DIM for d in shape):
            raise DataPlaneError(DataPlaneError.INVALID_ARGUMENT, f"input {tensor.name!r}: invalid shape {list(shape)}")
        params = dict(shared)
        params.update({k: parameter_value(v) for k, v in tensor.parameters.items()})
        if raw:
            data = raw[i]
        elif tensor.datatype == "FP32" and tensor.HasField("contents"):
            data = np.asarray(tensor.contents.fp32_contents, dtype="<f4").tobytes()
        else:
            raise DataPlaneError(
                DataPlaneError.INVALID_ARGUMENT,
                f"input {tensor.name!r} has no data: send raw_input_contents, or fp32_contents for FP32",
            )
        inputs.append(InferInput(tensor.name, tensor.datatype, shape, data, params))
    return inputs


class InferenceServicer(inference_pb2_grpc.GRPCInferenceServiceServicer):
    """Open Inference Protocol over a :class:`DataPlane`."""

    def __init__(self, plane: DataPlane, ready: bool = True) -> None:
        self.plane = plane
        self.ready = ready

    async def ServerLive(self, request, context):
        return inference_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return inference_pb2.ServerReadyResponse(ready=self.ready)

    async def ModelReady(self, request, context):
        return inference_pb2.ModelReadyResponse(ready=self.ready and request.name in self.plane.segments)

    async def ServerMetadata(self, request, context):
        return inference_pb2.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=[])

    async def ModelMetadata(self, request, context):
        async def handle():
            segment = self.plane.resolve(request.name)
            T = inference_pb2.ModelMetadataResponse.TensorMetadata
            return inference_pb2.ModelMetadataResponse(
                name=segment.name, versions=["1"], platform="pytorch_torchscript",
                inputs=[T(name="input", datatype="FP32", shape=[-1, *segment.input_shape])],
                outputs=[T(name="logits", datatype="FP32", shape=[-1, *segment.output_shape])],
            )
        return await _answer(handle, context)

    async def ModelInfer(self, request, context):
        started = time.perf_counter()
        label = request.model_name if request.model_name in self.plane.segments else "unknown"
        sent = 0

        async def handle():
            nonlocal sent
            result = await self.plane.infer(request.model_name, request_to_inputs(request))
            response = inference_pb2.ModelInferResponse(model_name=result.model_name, model_version="1", id=request.id)
            set_parameter(response.parameters["edge_compute_seconds"], float(result.compute_seconds))
            set_parameter(response.parameters["edge_queue_seconds"], float(result.queue_seconds))
            for out in result.outputs:
                tensor = response.outputs.add(name=out.name, datatype=out.datatype, shape=list(out.shape))
                if request.raw_input_contents:
                    response.raw_output_contents.append(out.data)
                else:
                    values = codec.decode(out.data, out.datatype, out.shape).flatten().tolist()
                    tensor.contents.fp32_contents.extend(values)
                sent += len(out.data)
            return response

        code = "OK"
        try:
            return await _answer(handle, context)
        except BaseException:
            code = _code_name(context)
            raise
        finally:
            metrics = self.plane.metrics
            if metrics:
                metrics.requests.labels(model=label, code=code).inc()
                metrics.request_seconds.labels(model=label).observe(time.perf_counter() - started)
                metrics.received_bytes.labels(model=label).inc(sum(len(b) for b in request.raw_input_contents))
                metrics.sent_bytes.labels(model=label).inc(sent)


def _code_name(context) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


async def _answer(handle, context):
    """Run a handler; turn every failure into a gRPC status (the one error boundary)."""
    try:
        return await handle()
    except DataPlaneError as exc:
        await context.abort(_STATUS[exc.code], exc.message)
    except grpc.aio.AbortError:
        raise
    except Exception as exc:  # defensive: a bug must answer INTERNAL, not kill the node
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


class ControlServicer(edgesplit_pb2_grpc.EdgeSplitControlServicer):
    """edgesplit.v1 control plane: node identity, cuts, codecs and segment profiles."""

    def __init__(self, plane: DataPlane, node_name: str, weights_sha256: str = "") -> None:
        self.plane = plane
        self.node_name = node_name
        self.weights_sha256 = weights_sha256

    async def NodeInfo(self, request, context):
        cuts = [
            edgesplit_pb2.CutInfo(index=c.index, name=c.name, shape=list(c.shape), datatype="FP32")
            for c in self.plane.model.cut_points()
        ]
        return edgesplit_pb2.NodeInfoResponse(
            node_name=self.node_name, version=SERVER_VERSION, model_name=self.plane.model.name,
            weights_sha256=self.weights_sha256, cuts=cuts, codecs=list(codec.CODECS),
            max_inflight=self.plane.max_inflight, max_batch=self.plane.max_batch,
            served_models=sorted(self.plane.segments),
        )

    async def SegmentProfile(self, request, context):
        profiles = []
        metrics = self.plane.metrics
        names = [request.model_name] if request.model_name else sorted(self.plane.segments)
        for name in names:
            if name not in self.plane.segments:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {name!r}")
            count, total = 0, 0.0
            if metrics:
                for metric in metrics.compute_seconds.collect():
                    for s in metric.samples:
                        if s.labels.get("model") == name and s.name.endswith("_count"):
                            count = int(s.value)
                        elif s.labels.get("model") == name and s.name.endswith("_sum"):
                            total = s.value
            profiles.append(edgesplit_pb2.SegmentProfile(
                model_name=name, requests=count, mean_seconds=total / count if count else 0.0, mean_batch=1.0,
            ))
        return edgesplit_pb2.SegmentProfileResponse(profiles=profiles)


class _Undecodable:
    """Stands in for a request whose bytes are not a valid protobuf message."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class RejectUndecodable(grpc.aio.ServerInterceptor):
    """Answer INVALID_ARGUMENT to undecodable request bytes (gRPC itself would say UNKNOWN)."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.response_streaming:
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
                    f"request to {details.method} is not a valid protobuf message: {request.error}",
                )
            return await behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(
            guarded, request_deserializer=safe_deserialize, response_serializer=handler.response_serializer
        )


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
        """Stop accepting, mark NOT_SERVING, let in-flight requests finish within ``grace``."""
        self.inference.ready = False
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_node_server(
    plane: DataPlane,
    host: str = "127.0.0.1",
    port: int = 0,
    node_name: str = "edge-node",
    weights_sha256: str = "",
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    credentials: grpc.ServerCredentials | None = None,
    token: str | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> NodeServer:
    """Start a grpc.aio server with the data plane, control plane, health and reflection.

    ``credentials`` (see :func:`edgesplit.runtime.tls.server_credentials`) makes the port
    TLS, mutual TLS when they hold a CA. With ``token``, every call but the health service
    must carry ``authorization: Bearer <token>`` (:class:`~edgesplit.runtime.auth.TokenAuthInterceptor`,
    run before ``interceptors``).
    """
    chain: list[grpc.aio.ServerInterceptor] = []
    if token is not None:
        chain.append(TokenAuthInterceptor(token))
    chain.extend(interceptors)
    chain.append(RejectUndecodable())
    server = grpc.aio.server(
        interceptors=chain or None,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            *SERVER_OPTIONS,
        ],
    )
    inference = InferenceServicer(plane)
    inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(inference, server)
    edgesplit_pb2_grpc.add_EdgeSplitControlServicer_to_server(ControlServicer(plane, node_name, weights_sha256), server)
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

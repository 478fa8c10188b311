"""Reference servers for the per-call overhead: the least a Python gRPC server can cost.

The throughput benchmark's ``overhead_ms`` (round trip minus edge compute, one client) is
set against a goal in absolute milliseconds above an empty call. What part of that is the
node's machinery and what part is Python gRPC itself? These servers answer the same Open
Inference Protocol calls for the same segment of the shipped model with nothing but the
work itself: ``parse_infer_request``, the node's own :func:`execute_batch` (decode, run,
encode, exactly as a node's worker does it) and ``build_infer_response``. No admission,
validation, queue, metrics, deadlines, health or authentication: not servers to deploy,
floors to measure against. Three kinds:

- ``aio-thread``: ``grpc.aio`` with the work in one worker thread (the node's idle path,
  minus the node): a hand-off to the thread and one back to the event loop;
- ``aio-inline``: ``grpc.aio`` with the work on the event loop (no hand-off; a node cannot
  do this without blocking every other request while a model runs);
- ``sync``: the synchronous ``grpc.server``, the work in the handler's own thread.

Run one with ``python -m edgesplit.bench.reference_server --kind KIND``: it serves on an
ephemeral loopback port and prints ``port N`` once it accepts calls;
:class:`ReferenceServer` starts and stops one as a child process.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

KINDS = ("aio-thread", "aio-inline", "sync")
MODEL = "resnet_fm"


def _served(model: str):
    """The node's registry of ``model``'s segments (shipped weights), one torch thread."""
    import torch

    from edgesplit.runtime.node.server import load_registry
    from edgesplit.runtime.node.settings import NodeSettings

    torch.set_num_threads(1)
    registry, _ = load_registry(NodeSettings(models=(model,), port=0, threads=1))
    return registry


def _handlers(registry):
    """ServerLive, ModelMetadata and ModelInfer as plain functions of a request."""
    from edgesplit.protos import inference_pb2
    from edgesplit.runtime.inference import InferError
    from edgesplit.runtime.node.batching import execute_batch
    from edgesplit.runtime.node.dataplane import MAX_INPUT_ELEMENTS
    from edgesplit.runtime.transport.oip import build_infer_response, parse_infer_request

    def live(_request):
        return inference_pb2.ServerLiveResponse(live=True)

    def metadata(request):
        model = registry.get(request.name, request.version)
        T = inference_pb2.ModelMetadataResponse.TensorMetadata
        return inference_pb2.ModelMetadataResponse(
            name=model.name, versions=[model.version], platform=model.platform,
            inputs=[T(name=s.name, datatype=s.datatypes[0], shape=[-1, *s.shape]) for s in model.inputs],
            outputs=[T(name=s.name, datatype=s.datatypes[0], shape=[-1, *s.shape]) for s in model.outputs])

    def infer(request):
        model = registry.get(request.model_name, request.model_version)
        answer = execute_batch(model, [parse_infer_request(request)], MAX_INPUT_ELEMENTS).answers[0]
        if isinstance(answer, InferError):
            raise answer
        return build_infer_response(answer, request.id, raw=True)

    return live, metadata, infer


def _servicer(kind: str, registry, pool: ThreadPoolExecutor):
    import grpc

    from edgesplit.protos import inference_pb2_grpc
    from edgesplit.runtime.inference import InferError

    live, metadata, infer = _handlers(registry)

    def guarded(fn, request, context):
        try:
            return fn(request)
        except InferError as exc:
            context.abort(grpc.StatusCode[exc.code], exc.message)  # InferError codes are gRPC's names

    if kind == "sync":
        class Sync(inference_pb2_grpc.GRPCInferenceServiceServicer):
            def ServerLive(self, request, context):
                return live(request)

            def ModelMetadata(self, request, context):
                return guarded(metadata, request, context)

            def ModelInfer(self, request, context):
                return guarded(infer, request, context)

        return Sync()

    async def aguarded(fn, request, context):
        try:
            if kind == "aio-inline" or fn is not infer:
                return fn(request)
            return await asyncio.get_running_loop().run_in_executor(pool, fn, request)
        except InferError as exc:
            await context.abort(grpc.StatusCode[exc.code], exc.message)

    class Async(inference_pb2_grpc.GRPCInferenceServiceServicer):
        async def ServerLive(self, request, context):
            return live(request)

        async def ModelMetadata(self, request, context):
            return await aguarded(metadata, request, context)

        async def ModelInfer(self, request, context):
            return await aguarded(infer, request, context)

    return Async()


def serve(kind: str, model: str = MODEL) -> None:
    """Serve ``model``'s segments with a reference server of ``kind`` until killed."""
    import grpc

    from edgesplit.protos import inference_pb2_grpc

    if kind not in KINDS:
        raise ValueError(f"unknown reference server {kind!r}; one of {', '.join(KINDS)}")
    registry = _served(model)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reference")
    servicer = _servicer(kind, registry, pool)
    if kind == "sync":
        server = grpc.server(ThreadPoolExecutor(max_workers=4))
        inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        print(f"port {port}", flush=True)
        server.wait_for_termination()
        return

    async def main() -> None:
        server = grpc.aio.server()
        inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"port {port}", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


class ReferenceServer:
    """A reference server of ``kind`` in a child process (a context manager)."""

    def __init__(self, kind: str, model: str = MODEL, start_timeout: float = 120.0) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown reference server {kind!r}; one of {', '.join(KINDS)}")
        self.kind, self.model, self.start_timeout = kind, model, start_timeout
        self.process: subprocess.Popen | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ReferenceServer:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edgesplit.bench.reference_server", "--kind", self.kind, "--model", self.model],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = self._first_line()
        except BaseException:
            self.stop()
            raise
        if not line.startswith("port "):
            if self.process.poll() is None:
                self.process.kill()
            err = self.process.stderr.read()[-2000:] if self.process.stderr else ""
            self.stop()
            raise RuntimeError(f"reference server {self.kind} did not start: {line!r} {err}")
        self.port = int(line.split()[1])
        return self

    def _first_line(self) -> str:
        import threading

        assert self.process is not None and self.process.stdout is not None
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(self.start_timeout)
        if not box:
            raise RuntimeError(f"reference server {self.kind} gave no port within {self.start_timeout:g} s")
        return box[0].strip()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait(30)
            for stream in (self.process.stdout, self.process.stderr):
                if stream is not None:
                    stream.close()

    def __enter__(self) -> ReferenceServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--model", default=MODEL)
    serve(**vars(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Closed-loop load generator for a node's Open Inference Protocol service, in its own process.

Each of ``--concurrency`` clients sends a request, waits for its answer, and sends the
next (a closed loop), for ``--warmup`` then ``--duration`` seconds; only requests that
start and finish inside the measured window count. A refused request
(RESOURCE_EXHAUSTED) counts as an error and its round trip as a rejection time; like a
device, which then completes that request locally, the client offloads its next request
once the node's pushback (``grpc-retry-pushback-ms``) has passed (``--ignore-pushback``:
at once).
It learns the input shape from the model's metadata, so it needs nothing but the
protocol (and numpy). Prints one JSON object.

Example::

    python -m edgesplit.bench.loadgen --target 127.0.0.1:8001 --model resnet_fm.from.4 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import grpc
import numpy as np

from edgesplit.protos import inference_pb2, inference_pb2_grpc

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def build_request(stub, model: str, seed: int = 0) -> inference_pb2.ModelInferRequest:
    """A batch-1 FP32 request of the shape the model's metadata gives."""
    meta = stub.ModelMetadata(inference_pb2.ModelMetadataRequest(name=model), timeout=30)
    shape = [1, *[int(d) for d in meta.inputs[0].shape[1:]]]
    x = np.random.default_rng(seed).standard_normal(shape).astype("<f4")
    req = inference_pb2.ModelInferRequest(model_name=model, id="load")
    req.inputs.add(name=meta.inputs[0].name, datatype="FP32", shape=shape)
    req.raw_input_contents.append(x.tobytes())
    return req


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summarise(samples: list[tuple[float, float, str, float]], window: float) -> dict:
    """samples: (start, latency_s, code, edge_compute_s)."""
    ok = [s for s in samples if s[2] == "OK"]
    rejected = [s[1] for s in samples if s[2] == "RESOURCE_EXHAUSTED"]
    errors: dict[str, int] = {}
    for s in samples:
        if s[2] != "OK":
            errors[s[2]] = errors.get(s[2], 0) + 1
    lat = [s[1] for s in ok]

    def ms(v: float | None) -> float | None:
        return None if v is None else round(1000 * v, 3)

    return {
        "requests": len(samples),
        "ok": len(ok),
        "rps": round(len(ok) / window, 1),
        "p50_ms": ms(percentile(lat, 50)),
        "p99_ms": ms(percentile(lat, 99)),
        "errors": sum(errors.values()),
        "errors_by_code": errors,
        "reject_p50_ms": ms(percentile(rejected, 50)),
        "edge_compute_p50_ms": ms(percentile([s[3] for s in ok], 50)),
        "overhead_p50_ms": ms(percentile([s[1] - s[3] for s in ok], 50)),
        "window_s": window,
    }


async def run_async(target: str, model: str, concurrency: int, warmup: float, duration: float,
                    honour_pushback: bool = True) -> dict:
    channels = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(min(concurrency, 4))]
    stubs = [inference_pb2_grpc.GRPCInferenceServiceStub(c) for c in channels]
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as sync:
        request = build_request(inference_pb2_grpc.GRPCInferenceServiceStub(sync), model)
    begin = time.perf_counter() + warmup
    end = begin + duration
    samples: list[tuple[float, float, str, float]] = []

    async def client(i: int) -> None:
        stub = stubs[i % len(stubs)]
        while True:
            started = time.perf_counter()
            if started >= end:
                return
            code, edge, pushback = "OK", 0.0, None
            try:
                response = await stub.ModelInfer(request, timeout=30)
                edge = response.parameters["edge_compute_seconds"].double_param
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
                pushback = dict(exc.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
            finished = time.perf_counter()
            if started >= begin and finished <= end:
                samples.append((started, finished - started, code, edge))
            if code == "RESOURCE_EXHAUSTED" and pushback and honour_pushback:
                # a device completes this request locally, and offloads again when the node said
                await asyncio.sleep(min(1.0, int(pushback) / 1000))

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    for c in channels:
        await c.close()
    return summarise(samples, duration)


def run_sync(target: str, model: str, warmup: float, duration: float, live: bool) -> dict:
    """One client with the synchronous stub (as a device runner calls): ModelInfer or ServerLive."""
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = None if live else build_request(stub, model)
        live_request = inference_pb2.ServerLiveRequest()
        begin = time.perf_counter() + warmup
        end = begin + duration
        samples = []
        while True:
            started = time.perf_counter()
            if started >= end:
                break
            code, edge = "OK", 0.0
            try:
                if live:
                    stub.ServerLive(live_request, timeout=30)
                else:
                    edge = stub.ModelInfer(request, timeout=30).parameters["edge_compute_seconds"].double_param
            except grpc.RpcError as exc:
                code = exc.code().name
            finished = time.perf_counter()
            if started >= begin:
                samples.append((started, finished - started, code, edge))
    return summarise(samples, duration)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgesplit.bench.loadgen", description=__doc__.split("\n")[0])
    p.add_argument("--target", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--sync", action="store_true", help="one client with the synchronous stub")
    p.add_argument("--live", action="store_true", help="with --sync: time ServerLive (an empty call)")
    p.add_argument("--ignore-pushback", action="store_true",
                   help="resend at once after RESOURCE_EXHAUSTED instead of waiting the node's pushback")
    args = p.parse_args(argv)
    if args.sync:
        result = run_sync(args.target, args.model, args.warmup, args.duration, args.live)
    else:
        result = asyncio.run(run_async(args.target, args.model, args.concurrency, args.warmup, args.duration,
                                       honour_pushback=not args.ignore_pushback))
    result["concurrency"] = 1 if args.sync else args.concurrency
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

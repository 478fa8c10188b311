"""``edge-node``: serve the tail segments of a model over gRPC, with health and metrics.

Example::

    edge-node --model resnet_fm --port 8001 --metrics-port 9091

SIGTERM (or Ctrl-C) stops it gracefully: it stops accepting requests, reports NOT_SERVING,
lets in-flight requests finish within ``--grace`` seconds, and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path

log = logging.getLogger("edgesplit.node")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-node", description="Serve a model's tail segments over gRPC.")
    p.add_argument("--model", default="resnet_fm", help="model from the zoo (default: resnet_fm)")
    p.add_argument("--weights", help="safetensors weights (default: the shipped ones)")
    p.add_argument("--random-weights", action="store_true", help="serve untrained weights (latency work)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8001, help="gRPC port; 0 picks a free one (default: 8001)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address of the /metrics endpoint")
    p.add_argument("--metrics-port", type=int, default=9091, help="Prometheus port; 0 picks one, -1 disables")
    p.add_argument("--port-file", help="write {port, metrics_port, pid} as JSON here once serving")
    p.add_argument("--name", default=socket.gethostname(), help="node name reported by NodeInfo")
    p.add_argument("--max-inflight", type=int, default=32, help="requests in flight before RESOURCE_EXHAUSTED")
    p.add_argument("--max-batch", type=int, default=64, help="largest batch accepted in one request")
    p.add_argument("--workers", type=int, default=2, help="model execution threads")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds to drain in-flight requests on SIGTERM")
    return p


async def serve(args: argparse.Namespace) -> int:
    import torch
    from edgesplit.models import build_model, load_trained
    from edgesplit.models.weights_io import sha256_file
    from prometheus_client import CollectorRegistry, start_http_server

    from .dataplane import DataPlane
    from .grpc_server import start_node_server
    from .metrics import NodeMetrics

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.random_weights:
        model, sha = build_model(args.model).eval(), ""
    else:
        model = load_trained(args.model, args.weights)
        from edgesplit.models import WEIGHTS_DIR

        sha = sha256_file(args.weights or WEIGHTS_DIR / f"{args.model}.safetensors")
    registry = CollectorRegistry()
    metrics = NodeMetrics(registry)
    plane = DataPlane(model, metrics, max_inflight=args.max_inflight, max_batch=args.max_batch, workers=args.workers)
    node = await start_node_server(plane, args.host, args.port, node_name=args.name, weights_sha256=sha)
    metrics_port = -1
    http = None
    if args.metrics_port >= 0:
        http, _ = start_http_server(args.metrics_port, args.metrics_host, registry)
        metrics_port = http.server_port
    log.info("serving %s on %s:%d (metrics port %d)", model.name, args.host, node.port, metrics_port)
    print(f"edge-node: serving {model.name} on {args.host}:{node.port}, metrics on port {metrics_port}", flush=True)
    if args.port_file:
        tmp = Path(args.port_file).with_suffix(".tmp")
        tmp.write_text(json.dumps({"port": node.port, "metrics_port": metrics_port, "pid": os.getpid()}))
        tmp.replace(args.port_file)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print(f"edge-node: draining {plane.inflight} in-flight requests", flush=True)
    await node.stop(args.grace)
    plane.close()
    if http:
        http.shutdown()
    print("edge-node: stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return asyncio.run(serve(args))
    except (FileNotFoundError, KeyError, ValueError) as exc:
        print(f"edge-node: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

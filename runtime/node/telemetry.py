"""A node's telemetry on the ZeroMQ bus: its queue depth and each served segment's compute time.

``edge-node --telemetry tcp://controller:5555`` publishes a ``Telemetry`` message with a
``NodeLoad`` every ``--telemetry-interval`` seconds (source ``node/<name>``); the cluster
controller adds the wait it implies to the predicted latency of plans that offload
(:meth:`edgesplit.runtime.control.remote.Controller.edge_wait_s`). Publishing never blocks
the node: a PUB socket drops messages it cannot send.
"""

from __future__ import annotations

import asyncio
import logging

from edgesplit.protos import telemetry_pb2

log = logging.getLogger(__name__)


def node_load(plane, registry) -> telemetry_pb2.Telemetry:
    """The node's load now: requests queued or running, and mean batch compute seconds per segment."""
    msg = telemetry_pb2.Telemetry()
    msg.node.queue_depth = plane.inflight
    for model in registry:
        if model.stats.batches:
            msg.node.segment_seconds[model.name] = model.stats.mean_compute_seconds
    return msg


async def publish_load(publisher, plane, registry, interval_s: float, stop: asyncio.Event) -> None:
    """Publish :func:`node_load` every ``interval_s`` until ``stop`` is set."""
    while not stop.is_set():
        try:
            publisher.publish(node_load(plane, registry))
        except Exception:  # the bus is advisory: a failure to publish must not touch serving
            log.exception("publishing node telemetry failed")
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
        except asyncio.TimeoutError:
            pass

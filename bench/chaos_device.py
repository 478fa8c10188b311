"""Device side of the chaos benchmark: answer N requests, record each answer, compare with local.

Runs inside the test bed's device namespace (``ip netns exec ... python -m
edgesplit.bench.chaos_device``), offloading to the edge nodes through a
:class:`~edgesplit.runtime.device.failover.FailoverClient`. It prints ``ready`` once warmed up,
then answers ``--requests`` inputs (the shipped sample, cycled) as fast as it can, and
writes one JSON line per answer, flushed line by line so that the orchestrator can follow
the progress (it kills a node once a given number of answers is written), then prints
``done``. The reference is a purely local computation with the same plan: identical local
exits, and the full model's logits wherever the edge answered.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="chaos_device")
    p.add_argument("--targets", required=True, help="comma-separated host:port of the edge nodes")
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--cut", type=int, default=4)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--codec", default="fp16")
    p.add_argument("--deadline", type=float, default=0.25)
    p.add_argument("--out", required=True, help="JSON lines, one per answer")
    args = p.parse_args(argv)

    from edgesplit.models import load_trained
    from edgesplit.models.datasets import load_sample, to_tensor
    from edgesplit.runtime.device.failover import FailoverClient
    from edgesplit.runtime.device.runner import WHERE_EDGE, DeviceRunner
    from edgesplit.runtime.transport.client import EdgeClient

    torch.set_num_threads(1)
    model = load_trained("resnet_fm")
    images, labels = load_sample()
    x = to_tensor(images)
    with torch.inference_mode():
        reference = model(x)  # the full model, computed locally, for every input
    client = FailoverClient([EdgeClient(t) for t in args.targets.split(",")], failure_threshold=2, reset_seconds=0.3)

    def make_runner() -> DeviceRunner:
        return DeviceRunner(model, cut=args.cut, thresholds=args.threshold, client=client, codec=args.codec,
                            deadline_s=args.deadline)

    warm = make_runner()
    for i in range(5):  # warm up connections and allocator; the measured runner numbers from 0
        warm.infer(x[i])
    runner = make_runner()
    print("ready", flush=True)
    # Line-buffered: each answer reaches the file as it is made, so the orchestrator can count
    # the answers so far (it kills edge1 at a given count).
    with open(args.out, "w", buffering=1) as out:
        for i in range(args.requests):
            k = i % len(x)
            a = runner.infer(x[k])
            diff = float((a.logits - reference[k : k + 1]).abs().max()) if a.where == WHERE_EDGE else 0.0
            out.write(json.dumps({
                "id": a.request_id, "input": k, "t": time.monotonic(), "where": a.where, "exit": a.exit,
                "prediction": a.prediction, "label": int(labels[k]), "latency": a.latency.total,
                "device": a.latency.device, "transfer": a.latency.transfer, "edge": a.latency.edge,
                "error": a.offload_error, "max_abs_diff": diff, "epoch": a.epoch,
            }) + "\n")
    client.close()
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

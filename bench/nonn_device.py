"""Device side of the NoNN benchmark's multi-host run (runs in the test bed's device namespace).

First it measures, with every member up, the latency and bytes of one request three ways:
the NoNN ensemble (input to every member at once), and head/tail splitting of the teacher
on the teacher's node at cut 0 (the image goes to the edge) and at ``--cut`` (the device
runs the head). It prints that as one JSON line, then ``ready``, then streams
``--requests`` test images through the ensemble at ``--rate`` per second, writing one JSON
line per answer (flushed line by line, so the orchestrator can kill members at a given
progress); with ``--stop-file`` it goes on past ``--requests`` until that file exists (so the
stream outlasts a restart however long it takes). Last it prints ``{"done": N}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def _median_ms(values: list[float]) -> float:
    return round(1000 * statistics.median(values), 3)


def _p95_ms(values: list[float]) -> float:
    ordered = sorted(values)
    return round(1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nonn_device")
    p.add_argument("--ensemble", required=True)
    p.add_argument("--members", required=True, help="comma-separated host:port, one per member, in order")
    p.add_argument("--teacher", required=True, help="host:port of a node serving the teacher")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--rate", type=float, default=40.0)
    p.add_argument("--deadline", type=float, default=0.25)
    p.add_argument("--latency-requests", type=int, default=200)
    p.add_argument("--cut", type=int, default=4)
    p.add_argument("--out", required=True)
    p.add_argument("--stop-file", help="after --requests, keep streaming until this file exists (at most 20x)")
    args = p.parse_args(argv)

    from edgesplit.models import load_trained
    from edgesplit.models.datasets import load_fashion_mnist, to_tensor
    from edgesplit.partitioner.nonn.bundle import load_ensemble
    from edgesplit.runtime import codec
    from edgesplit.runtime.device.ensemble import EnsembleClient
    from edgesplit.runtime.transport.client import EdgeClient

    torch.set_num_threads(1)
    ensemble = load_ensemble(args.ensemble)
    teacher = load_trained("resnet_fm")
    images, labels = load_fashion_mnist("test")
    x_all = to_tensor(images)
    members = [EdgeClient(t) for t in args.members.split(",")]
    nonn = EnsembleClient(ensemble, members, deadline_s=args.deadline)
    edge = EdgeClient(args.teacher)

    # Warm up until every member and the teacher's node answer (bounded).
    warm_until = time.monotonic() + 120
    while True:
        answer = nonn.classify(x_all[:1])
        try:
            edge.infer("resnet_fm", codec.encode(x_all[:1], "int8"), timeout=5, wait_for_ready=True)
            edge_ok = True
        except Exception:  # noqa: BLE001 - any failure means: not ready yet
            edge_ok = False
        if not answer.missing and edge_ok:
            break
        time.sleep(0.1)
        if time.monotonic() > warm_until:
            print(json.dumps({"error": f"members not ready: {answer.missing}, teacher node ok: {edge_ok}"}),
                  flush=True)
            return 1

    problems = nonn.check_members()
    if problems:
        print(json.dumps({"error": f"members serving other weights: {problems}"}), flush=True)
        return 1
    n = args.latency_requests
    lat: dict[str, list[float]] = {"nonn": [], "cut0": [], f"cut{args.cut}": []}
    sent: dict[str, int] = {}
    received: dict[str, int] = {}
    correct = {k: 0 for k in lat}
    with torch.no_grad():
        for k in range(n):
            x, y = x_all[k : k + 1], int(labels[k])
            a = nonn.classify(x)
            lat["nonn"].append(a.seconds)
            sent["nonn"], received["nonn"] = a.sent_bytes, a.received_bytes
            correct["nonn"] += int(a.logits.argmax()) == y
            started = time.perf_counter()
            enc = codec.encode(x, "int8")
            r = edge.infer("resnet_fm", enc, timeout=5)
            lat["cut0"].append(time.perf_counter() - started)
            sent["cut0"], received["cut0"] = len(enc.data), r.logits.numel() * 4
            correct["cut0"] += int(r.logits.argmax()) == y
            started = time.perf_counter()
            enc = codec.encode(teacher.run(x, 0, args.cut), "int8")
            r = edge.infer(f"resnet_fm.from.{args.cut}", enc, timeout=5)
            lat[f"cut{args.cut}"].append(time.perf_counter() - started)
            sent[f"cut{args.cut}"], received[f"cut{args.cut}"] = len(enc.data), r.logits.numel() * 4
            correct[f"cut{args.cut}"] += int(r.logits.argmax()) == y
    print(json.dumps({"latency": {k: {"p50_ms": _median_ms(v), "p95_ms": _p95_ms(v), "sent_bytes": sent[k],
                                      "received_bytes": received[k], "accuracy": round(correct[k] / n, 4),
                                      "requests": n} for k, v in lat.items()}}), flush=True)

    print("ready", flush=True)
    period = 1.0 / args.rate if args.rate > 0 else 0.0
    start = time.monotonic()
    stop = Path(args.stop_file) if args.stop_file else None
    k = 0
    with open(args.out, "w", buffering=1) as out, torch.no_grad():
        while k < args.requests or (stop is not None and not stop.exists() and k < 20 * args.requests):
            due = start + k * period
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)  # pacing like a camera, not a synchronisation
            i = k % len(labels)
            k += 1  # issued: counted before the answer, so a request without one shows as lost
            try:
                a = nonn.classify(x_all[i : i + 1], request_id=f"r{k - 1}")
            except Exception as exc:  # noqa: BLE001 - recorded, and the stream goes on
                out.write(json.dumps({"id": k - 1, "t": time.time(), "error": repr(exc)[:200]}) + "\n")
                continue
            out.write(json.dumps({"id": k - 1, "t": time.time(), "how": a.how, "answered": list(a.answered),
                                  "missing": {str(m): r for m, r in a.missing.items()},
                                  "correct": int(a.logits.argmax()) == int(labels[i]),
                                  "latency_s": round(a.seconds, 6)}) + "\n")
    print(json.dumps({"done": k}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

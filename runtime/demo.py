"""``edgesplit demo``: a local cluster on loopback with the shipped model, and a node failure.

It starts an ``edge-node`` process, runs the device runner over the shipped 1,000-image
sample at a fixed cut and threshold, kills the node with SIGKILL halfway, restarts it,
and prints accuracy, exit distribution, where requests ran, the latency breakdown and the
count of requests answered, which equals the count sent.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter

import torch
from tqdm import tqdm

from edgesplit.models import load_trained
from edgesplit.models.datasets import load_images, to_tensor

from .device.runner import WHERE_EDGE, Answer, DeviceRunner
from .node.launcher import NodeProcess
from .transport.client import EdgeClient


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summarise(answers: list[Answer], labels: list[int], sent: int) -> dict:
    """Accuracy, exits, placement and latency of a run, as plain numbers."""
    correct = [a.prediction == y for a, y in zip(answers, labels)]
    by_where: dict[str, list[bool]] = {}
    for a, ok in zip(answers, correct):
        by_where.setdefault(a.where, []).append(ok)
    latency = {}
    for part in ("device", "transfer", "edge", "total"):
        values = [a.latency.total if part == "total" else getattr(a.latency, part) for a in answers]
        latency[part] = {
            "mean_ms": 1000 * statistics.fmean(values) if values else 0.0,
            "p50_ms": 1000 * percentile(values, 50),
            "p99_ms": 1000 * percentile(values, 99),
        }
    ids = [a.request_id for a in answers]
    return {
        "sent": sent,
        "answered": len(answers),
        "lost": sent - len(set(ids)),
        "duplicated": len(ids) - len(set(ids)),
        "accuracy": sum(correct) / len(correct) if correct else 0.0,
        "exits": dict(Counter(a.exit for a in answers)),
        "where": dict(Counter(a.where for a in answers)),
        "accuracy_by_where": {w: sum(v) / len(v) for w, v in by_where.items()},
        "offload_errors": dict(Counter(a.offload_error for a in answers if a.offload_error)),
        "latency": latency,
    }


def run_demo(
    samples: int = 1000,
    cut: int = 4,
    threshold: float = 0.9,
    codec: str = "int8",
    deadline_s: float = 1.0,
    kill: bool = True,
    rate_hz: float = 50.0,
    progress: bool = True,
) -> dict:
    """Run the demo and return its summary (see :func:`summarise`).

    Requests arrive at ``rate_hz`` (a camera's frame rate; 0: as fast as possible), so
    the restarted node has time to come back while the run goes on.
    """
    torch.set_num_threads(1)
    model = load_trained("resnet_fm")
    images, labels = load_images("sample")
    x = to_tensor(images[:samples])
    ys = [int(v) for v in labels[:samples]]
    events: list[str] = []
    with NodeProcess(model="resnet_fm", threads=1) as node:
        events.append(f"edge-node started on {node.address} (metrics on port {node.metrics_port})")
        client = EdgeClient(node.address)
        runner = DeviceRunner(model, cut=cut, thresholds=threshold, client=client, codec=codec, deadline_s=deadline_s)
        answers: list[Answer] = []
        kill_at, restart_at = len(ys) // 2, int(len(ys) * 0.6)
        restarter: threading.Thread | None = None
        restored_at: list[float] = []
        first_edge_after: float | None = None
        started = time.monotonic()
        for i in tqdm(range(len(ys)), desc="requests", disable=not progress, unit="req"):
            if rate_hz > 0:
                time.sleep(max(0.0, started + i / rate_hz - time.monotonic()))
            if kill and i == kill_at:
                node.kill()
                events.append(f"request {i}: edge-node killed with SIGKILL")
            if kill and i == restart_at:

                def restart() -> None:
                    node.start()
                    restored_at.append(time.monotonic())

                restarter = threading.Thread(target=restart, daemon=True)
                restarter.start()
                events.append(f"request {i}: edge-node restarting on the same port")
            answer = runner.infer(x[i : i + 1])
            answers.append(answer)
            if restored_at and first_edge_after is None and answer.where == WHERE_EDGE:
                first_edge_after = time.monotonic() - restored_at[0]
                events.append(f"request {i}: first offloaded answer {first_edge_after:.2f} s after the node came back")
        if restarter:
            restarter.join()
        client.close()
    summary = summarise(answers, ys, len(ys))
    summary.update(cut=cut, threshold=threshold, codec=codec, rate_hz=rate_hz, events=events)
    return summary


def render_summary(s: dict) -> str:
    lines = ["", "edgesplit demo: resnet_fm on Fashion-MNIST sample, device runner + edge-node on loopback", ""]
    lines += [f"  {e}" for e in s.get("events", [])]
    lines += [
        "",
        f"plan: cut {s['cut']}, exit threshold {s['threshold']}, codec {s['codec']}, {s['rate_hz']:g} requests/s",
        f"requests sent {s['sent']}, answered {s['answered']}, lost {s['lost']}, duplicated {s['duplicated']}",
        f"accuracy {100 * s['accuracy']:.2f}%",
        "where:  "
        + ", ".join(f"{w} {n} ({100 * s['accuracy_by_where'][w]:.1f}% correct)" for w, n in sorted(s["where"].items())),
        "exits:  " + ", ".join(f"{e} {n}" for e, n in sorted(s["exits"].items())),
    ]
    if s["offload_errors"]:
        lines.append(
            "offload failures (completed locally): " + ", ".join(f"{k} {v}" for k, v in s["offload_errors"].items())
        )
    lines += ["", f"{'latency':<10}{'mean ms':>10}{'p50 ms':>10}{'p99 ms':>10}"]
    for part, v in s["latency"].items():
        lines.append(f"{part:<10}{v['mean_ms']:>10.2f}{v['p50_ms']:>10.2f}{v['p99_ms']:>10.2f}")
    return "\n".join(lines)

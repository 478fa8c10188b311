"""Throughput benchmark: an edge node under closed-loop load, with and without dynamic batching.

For ``resnet_fm`` (the whole network, a 28x28 image in) and ``resnet_fm.from.4`` (the tail
after cut 4, a 16x28x28 crossing tensor in), closed-loop clients at concurrency 1, 8, 32
and 128 load one ``edge-node`` process; the load generator runs in its own process
(:mod:`edgesplit.bench.loadgen`) on the same 2-core machine, so the figures include the
client's cost. Each level is measured with batching on and off (a node started with
``--no-batching``), both at the node's default thread settings. In the same run:

- ``ceiling_ips``: the in-process torch ceiling, images/s at batch 32 with no serving at
  all: the better of one caller with as many intra-op threads as cores and one
  single-threaded caller per core (``ceiling_detail`` has both);
- ``empty_call_ms``: the median round trip of ServerLive (an empty call) from a
  synchronous client, as a device runner calls;
- ``overhead_ms``: the median of (round trip - edge compute) for ``resnet_fm.from.4`` at
  concurrency 1, fp32, from the same synchronous client;
- ``overhead_floor``: the same two figures for the reference servers of
  :mod:`edgesplit.bench.reference_server` (the same segment and per-request work with no
  node around it: ``grpc.aio`` with one thread hand-off, ``grpc.aio`` inline, synchronous
  ``grpc``), per kind ``empty_call_ms``, ``overhead_ms`` and ``excess_ms`` (their
  difference): what Python gRPC itself costs on this machine, against which the node's
  excess over its empty call is read.

Each level runs ``repeats`` times (3; ``--quick``: once, 2 s instead of 5) and the run
with the median rate is reported, its rates all listed in ``rps_runs``. A refused request
(RESOURCE_EXHAUSTED) is counted in ``errors``; the client honours the
node's pushback before its next request, as a device that completes locally meanwhile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from edgesplit.bench import machine_info, table

MODELS = ("resnet_fm", "resnet_fm.from.4")
CONCURRENCY = (1, 8, 32, 128)
CEILING_BATCH = 32


def _ips(model, start: int, batch: int, seconds: float, callers: int) -> float:
    """Images per second of ``callers`` threads each running ``model`` from ``start`` at ``batch``."""
    import threading

    import torch

    x = torch.randn(batch, *model.cut_points()[start].shape)
    counts = [0] * callers

    def work(i: int) -> None:
        with torch.inference_mode():
            for _ in range(3):
                model.run(x, start)
            began = time.perf_counter()
            while time.perf_counter() - began < seconds:
                model.run(x, start)
                counts[i] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(callers)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return batch * sum(counts) / (time.perf_counter() - began)


def ceiling_ips(model_names=MODELS, batch: int = CEILING_BATCH, seconds: float = 2.0) -> tuple[dict, dict]:
    """The in-process torch ceiling at ``batch``: the better of one caller with as many intra-op
    threads as cores, and one single-threaded caller per core (how the node runs). Returns the
    ceiling per model and both measurements."""
    import torch

    from edgesplit.models import load_trained

    cores = os.cpu_count() or 1
    previous = torch.get_num_threads()
    model = load_trained("resnet_fm")
    ceiling, detail = {}, {}
    try:
        for name in model_names:
            start = int(name.rsplit(".", 1)[1]) if ".from." in name else 0
            torch.set_num_threads(cores)
            one_caller = _ips(model, start, batch, seconds, 1)
            torch.set_num_threads(1)
            per_core = _ips(model, start, batch, seconds, cores)
            ceiling[name] = round(max(one_caller, per_core), 1)
            detail[name] = {f"1_caller_x_{cores}_threads": round(one_caller, 1),
                            f"{cores}_callers_x_1_thread": round(per_core, 1)}
    finally:
        torch.set_num_threads(previous)
    return ceiling, detail


def load(target: str, model: str, concurrency: int, duration: float, sync: bool = False, live: bool = False,
         warmup: float = 1.0) -> dict:
    """Run the load generator in its own process and return its JSON."""
    cmd = [sys.executable, "-m", "edgesplit.bench.loadgen", "--target", target, "--model", model,
           "--concurrency", str(concurrency), "--duration", str(duration), "--warmup", str(warmup)]
    if sync:
        cmd.append("--sync")
    if live:
        cmd.append("--live")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + warmup + 120)
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"load generator failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def node_settings(node) -> dict:
    """Workers, threads and batching the node reports (edgesplit.v1 NodeInfo)."""
    import grpc

    from edgesplit.protos import edgesplit_pb2, edgesplit_pb2_grpc

    with grpc.insecure_channel(node.address) as channel:
        info = edgesplit_pb2_grpc.EdgeSplitControlStub(channel).NodeInfo(edgesplit_pb2.NodeInfoRequest(), timeout=10)
        profiles = edgesplit_pb2_grpc.EdgeSplitControlStub(channel).SegmentProfile(
            edgesplit_pb2.SegmentProfileRequest(), timeout=10)
    model = {m.name: m for m in info.models}["resnet_fm"]
    return {
        "workers": info.workers, "intra_op_threads": info.intra_op_threads, "max_inflight": info.max_inflight,
        "batching": model.batching, "preferred_batch": model.preferred_batch, "max_batch": model.max_batch,
        "max_queue_delay_ms": round(1000 * model.max_queue_delay_seconds, 3),
        "mean_batch": {p.model_name: round(p.mean_batch, 2) for p in profiles.profiles if p.model_name in MODELS},
    }


def run(quick: bool = False, progress: bool = True) -> dict:
    from tqdm import tqdm

    from edgesplit.runtime.node.launcher import NodeProcess

    duration = 2.0 if quick else 5.0
    repeats = 1 if quick else 3
    ceiling, ceiling_detail = ceiling_ips(seconds=1.0 if quick else 3.0)
    levels, nodes = [], {}
    empty_call = overhead = floor = None
    steps = 2 * len(MODELS) * len(CONCURRENCY)
    bar = tqdm(total=steps, desc="load levels", disable=not progress, unit="level")
    for batching in (False, True):
        extra = [] if batching else ["--no-batching"]
        with NodeProcess(model="resnet_fm", threads=1, metrics_port=-1, extra_args=extra) as node:
            if not batching:  # the single-request path: what a device pays per call (median of runs)
                empty_call = sorted(load(node.address, MODELS[1], 1, duration, sync=True, live=True)["p50_ms"]
                                    for _ in range(repeats))[repeats // 2]
                overhead = sorted(load(node.address, MODELS[1], 1, duration, sync=True)["overhead_p50_ms"]
                                  for _ in range(repeats))[repeats // 2]
            for model in MODELS:
                for concurrency in CONCURRENCY:
                    # Each level several times: the run with the median rate is reported, so one
                    # disturbed run (the VM, other processes) does not decide a figure.
                    runs = sorted((load(node.address, model, concurrency, duration) for _ in range(repeats)),
                                  key=lambda r: r["rps"])
                    r = runs[len(runs) // 2]
                    levels.append({
                        "model": model, "batching": batching, "concurrency": concurrency, "rps": r["rps"],
                        "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "errors": r["errors"],
                        "reject_p50_ms": r["reject_p50_ms"], "edge_compute_p50_ms": r["edge_compute_p50_ms"],
                        "rps_runs": [x["rps"] for x in runs],
                    })
                    bar.update()
            nodes["batching" if batching else "no_batching"] = node_settings(node)
        if not batching:
            floor = overhead_floor(duration, repeats)
    bar.close()
    return {
        "machine": machine_info(),
        "duration_s": duration,
        "repeats": repeats,
        "levels": levels,
        "ceiling_ips": ceiling,
        "ceiling_batch": CEILING_BATCH,
        "ceiling_detail": ceiling_detail,
        "empty_call_ms": empty_call,
        "overhead_ms": overhead,
        "overhead_floor": floor,
        "nodes": nodes,
        "goals": goals(levels, ceiling, empty_call, overhead),
    }


def overhead_floor(duration: float, repeats: int) -> dict:
    """Empty call and overhead of each reference server, measured as the node's are (median of runs)."""
    from edgesplit.bench.reference_server import KINDS, ReferenceServer

    floor = {}
    for kind in KINDS:
        with ReferenceServer(kind) as server:
            empty = sorted(load(server.address, MODELS[1], 1, duration, sync=True, live=True)["p50_ms"]
                           for _ in range(repeats))[repeats // 2]
            over = sorted(load(server.address, MODELS[1], 1, duration, sync=True)["overhead_p50_ms"]
                          for _ in range(repeats))[repeats // 2]
        floor[kind] = {"empty_call_ms": empty, "overhead_ms": over, "excess_ms": round(over - empty, 3)}
    return floor


def _level(levels: list[dict], model: str, batching: bool, concurrency: int) -> dict:
    return next(r for r in levels if r["model"] == model and r["batching"] == batching
                and r["concurrency"] == concurrency)


def goals(levels: list[dict], ceiling: dict, empty_call: float | None, overhead: float | None) -> dict:
    """The issue's goals, evaluated on this run's figures."""
    on32, off32 = _level(levels, "resnet_fm", True, 32), _level(levels, "resnet_fm", False, 32)
    on128 = _level(levels, "resnet_fm", True, 128)
    return {
        "batched_over_unbatched_c32": round(on32["rps"] / off32["rps"], 2) if off32["rps"] else None,
        "batched_c32_share_of_ceiling": round(on32["rps"] / ceiling["resnet_fm"], 3),
        "batched_c32_p99_ms": on32["p99_ms"],
        "c128_goodput_share_of_c32": round(on128["rps"] / on32["rps"], 3) if on32["rps"] else None,
        "c128_reject_p50_ms": on128["reject_p50_ms"],
        "overhead_minus_empty_ms": round(overhead - empty_call, 3) if None not in (overhead, empty_call) else None,
    }


def render(result: dict) -> str:
    rows = [[r["model"], "on" if r["batching"] else "off", r["concurrency"], r["rps"], r["p50_ms"], r["p99_ms"],
             r["errors"], "-" if r["reject_p50_ms"] is None else r["reject_p50_ms"]] for r in result["levels"]]
    out = [table(["model", "batching", "clients", "req/s", "p50 ms", "p99 ms", "refused", "refusal p50 ms"], rows)]
    out.append("")
    out.append("in-process ceiling at batch 32 (images/s): "
               + ", ".join(f"{k} {v:g}" for k, v in result["ceiling_ips"].items()))
    out.append(f"empty call (ServerLive) {result['empty_call_ms']} ms; overhead of resnet_fm.from.4 at 1 client "
               f"(round trip - edge compute) {result['overhead_ms']} ms")
    if result.get("overhead_floor"):
        out.append("the same per reference server (no node around the work), overhead - empty call: " + "; ".join(
            f"{kind} {f['overhead_ms']} - {f['empty_call_ms']} = {f['excess_ms']} ms"
            for kind, f in result["overhead_floor"].items()))
    g = result["goals"]
    out.append("")
    out.append(f"goals: batched/unbatched at 32 clients {g['batched_over_unbatched_c32']}x (>= 2); "
               f"share of ceiling {g['batched_c32_share_of_ceiling']} (>= 0.5); p99 {g['batched_c32_p99_ms']} ms "
               f"(< 100); goodput at 128 / at 32 {g['c128_goodput_share_of_c32']} (>= 0.9); refusal p50 at 128 "
               f"{g['c128_reject_p50_ms']} ms (< 5); overhead - empty call {g['overhead_minus_empty_ms']} ms (<= 0.3)")
    for name, n in result.get("nodes", {}).items():
        out.append(f"node ({name}): {n['workers']} workers x {n['intra_op_threads']} threads, max in flight "
                   f"{n['max_inflight']}, batching {n['batching']} (preferred {n['preferred_batch']}, max "
                   f"{n['max_batch']}, delay {n['max_queue_delay_ms']} ms), mean batch {n['mean_batch']}")
    return "\n".join(out)


def plot(result: dict, path: str) -> None:
    """Requests per second against clients, batching on and off, with the ceiling; and p99."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {"resnet_fm": "tab:blue", "resnet_fm.from.4": "tab:orange"}
    for model in MODELS:
        for batching, style in ((True, "-o"), (False, "--s")):
            rows = [r for r in result["levels"] if r["model"] == model and r["batching"] == batching]
            label = f"{model}, batching {'on' if batching else 'off'}"
            xs = [r["concurrency"] for r in rows]
            ax.plot(xs, [r["rps"] for r in rows], style, color=colours[model], label=label)
            lat.plot(xs, [r["p99_ms"] for r in rows], style, color=colours[model], label=label)
        ax.axhline(result["ceiling_ips"][model], color=colours[model], linestyle=":", linewidth=1)
        ax.text(1, result["ceiling_ips"][model], f" in-process ceiling, batch 32 ({model})", va="bottom",
                fontsize=7, color=colours[model])
    for a in (ax, lat):
        a.set_xscale("log", base=2)
        a.set_xticks(list(CONCURRENCY), [str(c) for c in CONCURRENCY])
        a.set_xlabel("closed-loop clients")
        a.grid(alpha=0.3)
    ax.set_ylabel("answered requests / s")
    ax.set_ylim(0, max(result["ceiling_ips"].values()) * 1.1)
    lat.set_ylabel("p99 latency (ms)")
    lat.legend(fontsize=7)
    fig.suptitle(f"edge-node throughput, {result['machine']['cpus']} cores, client on the same machine")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

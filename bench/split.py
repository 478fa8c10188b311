"""``edgesplit bench split``: does the partitioner pick the cut that measures fastest?

For each model, device class and bandwidth it predicts every cut's latency from two
measured profiles and picks one, then measures the candidate cuts end to end in the test
bed and compares:

- the **edge** is an ``edge-node --bundle`` in the ``edge1`` namespace, pinned to one core
  (``taskset -c 1``, one worker, one torch thread); its profile comes from the node itself
  over the ``edgesplit.v1`` ``GraphProfile`` call;
- the **device** is :mod:`edgesplit.bench.split_device` in the ``device`` namespace, pinned
  to the other core under a CFS quota per device class (``pi4`` 0.6 of a core, ``pizero2``
  0.15, ``mcu`` 0.05; period from :func:`~edgesplit.testbed.cgroups.smooth_period_us`); it
  profiles itself under that quota, node by node, then times the compiled heads of the
  candidate cuts to calibrate that profile (:func:`~edgesplit.partitioner.profile.calibrate`);
- the **link** is tbf on the device's veth, both directions, at each bandwidth; the RTT in
  the cost model is the fixed cost of an offload measured over that link: the median of a
  near-empty request (the last small tail) less the time its bytes take.

Candidates are the cuts :func:`~edgesplit.partitioner.optimise.undominated_cuts` keeps
(every other cut sends at least as much as an earlier one and so cannot be faster while the
device is the slower side) plus the optimiser's choice. Each is measured ``repeats`` times
in rounds (median kept). A row's ``best_cut`` is the fastest measured candidate.

Run as root: ``edgesplit bench split --json bench/results/split.json`` (about 20 minutes);
``--quick`` measures two models, two device classes and three bandwidths (under 3 minutes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import machine_info, table

FULL = {
    "models": ("resnet_fm", "mobilenet_v2", "resnet18"),
    "devices": ("pi4", "pizero2", "mcu"),
    "bandwidths": (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0),
    "repeats": 3, "warmup": 1, "device_profile_repeats": 3, "segment_repeats": 5, "edge_profile_repeats": 9,
}
QUICK = {
    "models": ("resnet_fm", "mobilenet_v2"),
    "devices": ("pi4", "mcu"),
    "bandwidths": (1.0, 10.0, 100.0),
    "repeats": 2, "warmup": 1, "device_profile_repeats": 2, "segment_repeats": 3, "edge_profile_repeats": 5,
}
EDGE_PORT = 8001
CODEC = "int8"
TBF_LATENCY_S = 4.0  # queue instead of dropping: one request's burst must fit (150 kB at 0.5 Mbit/s is 2.4 s)
GOALS = {"share_within_10pct": 0.9, "median_predicted_over_measured": (0.8, 1.25)}
REPLY_TIMEOUT_S = 1800.0


def tbf_burst(rate_mbit: float) -> int:
    """A bucket of two full frames: an idle link must not send a small request at line rate for free."""
    return 2 * 1514


def kind(cut: int, last: int) -> str:
    return "edge" if cut == 0 else "device" if cut == last else "intermediate"


class DeviceProcess:
    """The device-side process of one model: JSON commands in, JSON answers out."""

    def __init__(self, proc: subprocess.Popen, name: str) -> None:
        self.proc = proc
        self.name = name
        self.hello = self._read(300.0)
        self.last = self.hello.get("last")

    def _read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], min(1.0, max(0.0, deadline - time.monotonic())))
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"the device process of {self.name} exited ({self.proc.wait()}); "
                                       f"see its log")
                answer = json.loads(line)
                if "error" in answer:
                    raise RuntimeError(f"device process of {self.name}: {answer['error']}")
                return answer
            if time.monotonic() > deadline:
                raise TimeoutError(f"the device process of {self.name} did not answer in {timeout:.0f} s")

    def ask(self, timeout: float = REPLY_TIMEOUT_S, **command) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def _write_bundle(name: str, out: Path) -> None:
    import torch

    from edgesplit.models import build_model, load_trained
    from edgesplit.partitioner.bundle import write_bundle

    torch.manual_seed(0)
    model = load_trained(name) if name == "resnet_fm" else build_model(name)  # random weights: latency only
    write_bundle(model, out, extra={"weights": "shipped" if name == "resnet_fm" else "random (seed 0)"})


def _row(name: str, device: str, quota: float, bandwidth: float, rtt_ms: float, cuts, preds, chosen,
         times: dict[int, list[float]]) -> dict:
    last = cuts[-1].index
    predicted = {p.cut: 1000 * p.total_s for p in preds}
    measured = {c: statistics.median(v) for c, v in times.items()}
    best = min(measured, key=lambda c: (measured[c], -c))
    chosen_ms = measured[chosen.cut]
    return {
        "model": name, "device": device, "cpu_quota": quota, "bandwidth_mbit": bandwidth, "rtt_ms": rtt_ms,
        "chosen_cut": chosen.cut, "chosen_after": cuts[chosen.cut].after, "chosen_kind": kind(chosen.cut, last),
        "chosen_ms": chosen_ms, "chosen_predicted_ms": predicted[chosen.cut],
        "best_cut": best, "best_after": cuts[best].after, "best_kind": kind(best, last), "best_ms": measured[best],
        "all_device_ms": measured[last], "all_edge_ms": measured[0],
        "speedup_vs_all_device": measured[last] / chosen_ms, "speedup_vs_all_edge": measured[0] / chosen_ms,
        "within_10pct": chosen_ms <= 1.1 * measured[best],
        "predicted_over_measured": statistics.median(predicted[c] / measured[c] for c in measured),
        "cuts": [{"cut": c, "after": cuts[c].after, "bytes": next(p.bytes for p in preds if p.cut == c),
                  "predicted_ms": predicted[c], "measured_ms": measured[c], "samples_ms": times[c]}
                 for c in sorted(measured)],
    }


def _measure_model(bed, name: str, config: dict, work: Path, progress: bool) -> tuple[list[dict], dict]:
    from edgesplit.partitioner.bundle import load_bundle
    from edgesplit.partitioner.cost import Link, predict
    from edgesplit.partitioner.cuts import enumerate_cuts
    from edgesplit.partitioner.explain import DEVICE_QUOTAS, POWER
    from edgesplit.partitioner.optimise import choose, undominated_cuts
    from edgesplit.partitioner.profile import Profile, calibrate
    from edgesplit.runtime.node.launcher import NodeProcess
    from edgesplit.testbed.cgroups import smooth_period_us

    bundle = work / name
    _write_bundle(name, bundle)
    cuts = enumerate_cuts(load_bundle(bundle).graph)
    candidates = undominated_cuts(cuts, CODEC)
    graph_name = f"{name}.graph"
    node = NodeProcess(model=None, host=bed.address("edge1"), port=EDGE_PORT, metrics_port=-1, threads=1,
                       command_prefix=[*bed.exec_prefix("edge1"), "taskset", "-c", "1"],
                       extra_args=["--bundle", str(bundle), "--workers", "1"], log_path=work / f"{name}-edge.log",
                       startup_timeout=300)
    rows, profiles = [], {}
    quota = bed.cpu_quota("device", 1.0, smooth_period_us(1.0))
    device = None
    with node:
        log = open(work / f"{name}-device.log", "w")
        proc = bed.exec("device", ["taskset", "-c", "0", sys.executable, "-m", "edgesplit.bench.split_device",
                                   "--bundle", str(bundle), "--target", f"{bed.address('edge1')}:{EDGE_PORT}",
                                   "--graph", graph_name],
                        cpu=quota, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            device = DeviceProcess(proc, name)
            bed.unshape("device")
            edge = Profile.from_json(device.ask(op="edge_profile", repeats=config["edge_profile_repeats"])["profile"])
            profiles["edge"] = {"total_ms": 1000 * sum(edge.seconds[1]), "threads": edge.threads,
                                "decode_ns_per_element": 1e9 * edge.decode_seconds_per_element}
            for device_class in config["devices"]:
                q = DEVICE_QUOTAS[device_class]
                bed.cpu_quota(quota, q, smooth_period_us(q))
                # Idle two periods before each profiled run and each measured request: the budget
                # refills, as it does while a deployed device waits for its next frame.
                pause_s = 2 * smooth_period_us(q) / 1e6
                mine = Profile.from_json(device.ask(op="profile", repeats=config["device_profile_repeats"],
                                                    quota=q, pause_s=pause_s)["profile"])
                interpreted_ms, encode_ns = 1000 * sum(mine.seconds[1]), 1e9 * mine.encode_seconds_per_element
                heads = device.ask(op="segments", cuts=candidates, repeats=config["segment_repeats"],
                                   pause_s=pause_s, codec=CODEC)["seconds"]
                # The timed segments include encoding: it is not charged a second time.
                mine = dataclasses.replace(calibrate(mine, {int(k): v for k, v in heads.items()}),
                                           encode_seconds_per_element=0.0)
                profiles[device_class] = {"cpu_quota": q, "period_us": smooth_period_us(q),
                                          "interpreted_total_ms": interpreted_ms,
                                          "heads_ms": {k: 1000 * v for k, v in heads.items()},
                                          "total_ms": 1000 * sum(mine.seconds[1]),
                                          "encode_ns_per_element": encode_ns}
                for bandwidth in config["bandwidths"]:
                    bed.shape("device", bandwidth, burst=tbf_burst(bandwidth), latency=TBF_LATENCY_S)
                    trip = device.ask(op="round_trip", cut=candidates[-2], repeats=5, pause_s=pause_s)
                    # What is left of a near-empty request once its bytes are paid: the fixed cost
                    # of any offload, which the cost model calls the round-trip time.
                    link = Link(bandwidth, 0.0, burst_bytes=tbf_burst(bandwidth))
                    carried = link.transfer_seconds(trip["sent_bytes"], trip["answer_bytes"])
                    rtt_ms = max(0.1, trip["ms"] - 1000 * carried)
                    link = Link(bandwidth, rtt_ms / 1000, burst_bytes=tbf_burst(bandwidth))
                    preds = predict(cuts, mine, edge, link, codec=CODEC,
                                    power=POWER[device_class])
                    # The choice is among the cuts whose device side was timed whole: between
                    # them the calibrated profile is an interpolation, and under a CPU quota
                    # the device's time is a step function of its work, not a straight line.
                    chosen = choose([p for p in preds if p.cut in candidates])
                    measure = sorted(set(candidates) | {chosen.cut})
                    started = time.monotonic()
                    times = device.ask(op="measure", cuts=measure, repeats=config["repeats"],
                                       warmup=config["warmup"], codec=CODEC, pause_s=pause_s)["ms"]
                    row = _row(name, device_class, q, bandwidth, rtt_ms, cuts, preds, chosen,
                               {int(k): v for k, v in times.items()})
                    rows.append(row)
                    if progress:
                        print(f"split: {name} {device_class} {bandwidth:g} Mbit/s: chose {row['chosen_cut']} "
                              f"({row['chosen_ms']:.0f} ms), best {row['best_cut']} ({row['best_ms']:.0f} ms) "
                              f"[{time.monotonic() - started:.0f} s]", flush=True)
        finally:
            if device is not None:
                device.close()
            elif proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
            bed.unshape("device")
    return rows, profiles


def summarise(rows: list[dict]) -> dict:
    kinds = {k: sum(r["best_kind"] == k for r in rows) for k in ("device", "intermediate", "edge")}
    share = sum(r["within_10pct"] for r in rows) / len(rows)
    ratio = statistics.median(r["predicted_over_measured"] for r in rows)
    return {
        "rows": len(rows),
        "share_within_10pct": share,
        "median_predicted_over_measured": ratio,
        "best_kinds": kinds,
        "chosen_kinds": {k: sum(r["chosen_kind"] == k for r in rows) for k in ("device", "intermediate", "edge")},
        "median_speedup_vs_all_device": statistics.median(r["speedup_vs_all_device"] for r in rows),
        "median_speedup_vs_all_edge": statistics.median(r["speedup_vs_all_edge"] for r in rows),
        "goals": GOALS,
        "goals_met": {
            "share_within_10pct": share >= GOALS["share_within_10pct"],
            "median_predicted_over_measured": GOALS["median_predicted_over_measured"][0] <= ratio
            <= GOALS["median_predicted_over_measured"][1],
            "best_kinds": all(v >= 1 for v in kinds.values()),
        },
    }


def run(quick: bool = False, progress: bool = True, config: dict | None = None) -> dict:
    from edgesplit.testbed.bed import Testbed

    if os.geteuid() != 0:
        raise SystemExit("the split benchmark builds network namespaces and CPU quotas: run it as root")
    config = dict(config or (QUICK if quick else FULL))
    work = Path(tempfile.mkdtemp(prefix="edgesplit-split-"))
    rows, profiles = [], {}
    with Testbed(hosts={"device": "198.18.0.1", "edge1": "198.18.0.11"}) as bed:
        for name in config["models"]:
            model_rows, profiles[name] = _measure_model(bed, name, config, work, progress)
            rows.extend(model_rows)
    return {
        "config": {**config, "codec": CODEC, "tbf_latency_s": TBF_LATENCY_S, "edge": "one core, one worker",
                   "device_pinned_core": 0, "edge_pinned_core": 1},
        "profiles": profiles,
        "rows": rows,
        "summary": summarise(rows),
        "logs": str(work),
        "machine": machine_info(),
    }


def render(result: dict) -> str:
    headers = ["model", "device", "Mbit/s", "chosen", "chosen ms", "best", "best ms", "all-device ms",
               "all-edge ms", "pred/meas", "x vs device", "x vs edge"]
    body = []
    for r in result["rows"]:
        body.append([r["model"], r["device"], f"{r['bandwidth_mbit']:g}", f"{r['chosen_cut']} {r['chosen_kind'][:5]}",
                     f"{r['chosen_ms']:.1f}", f"{r['best_cut']} {r['best_kind'][:5]}", f"{r['best_ms']:.1f}",
                     f"{r['all_device_ms']:.1f}", f"{r['all_edge_ms']:.1f}", f"{r['predicted_over_measured']:.2f}",
                     f"{r['speedup_vs_all_device']:.2f}", f"{r['speedup_vs_all_edge']:.2f}"])
    s = result["summary"]
    lo, hi = s["goals"]["median_predicted_over_measured"]
    lines = [table(headers, body), "",
             f"chosen cut within 10% of the measured best: {s['share_within_10pct']:.0%} of {s['rows']} rows "
             f"(goal >= {s['goals']['share_within_10pct']:.0%})",
             f"median predicted / measured: {s['median_predicted_over_measured']:.2f} (goal {lo}-{hi})",
             f"measured best on the device / at an intermediate cut / on the edge: {s['best_kinds']['device']} / "
             f"{s['best_kinds']['intermediate']} / {s['best_kinds']['edge']} rows",
             f"median speed-up of the chosen plan: {s['median_speedup_vs_all_device']:.2f}x over all on the device, "
             f"{s['median_speedup_vs_all_edge']:.2f}x over all on the edge"]
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Measured latency against bandwidth per model and device class: all-device, all-edge, chosen, best."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in result["rows"]))
    devices = list(dict.fromkeys(r["device"] for r in result["rows"]))
    fig, axes = plt.subplots(len(models), len(devices), figsize=(4 * len(devices), 3.2 * len(models)),
                             squeeze=False)
    for i, m in enumerate(models):
        for j, d in enumerate(devices):
            ax = axes[i][j]
            rows = sorted((r for r in result["rows"] if r["model"] == m and r["device"] == d),
                          key=lambda r: r["bandwidth_mbit"])
            if not rows:
                ax.set_visible(False)
                continue
            bw = [r["bandwidth_mbit"] for r in rows]
            ax.plot(bw, [r["all_device_ms"] for r in rows], "s--", color="tab:blue", label="all on device")
            ax.plot(bw, [r["all_edge_ms"] for r in rows], "^--", color="tab:green", label="all on edge")
            ax.plot(bw, [r["best_ms"] for r in rows], "-", color="0.6", lw=4, alpha=0.6, label="measured best")
            ax.plot(bw, [r["chosen_ms"] for r in rows], "o-", color="tab:red", label="chosen (predicted best)")
            for r in rows:
                if r["chosen_kind"] == "intermediate":
                    ax.annotate(str(r["chosen_cut"]), (r["bandwidth_mbit"], r["chosen_ms"]), fontsize=7,
                                xytext=(2, 4), textcoords="offset points")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{m}, {d} ({rows[0]['cpu_quota']:g} core)", fontsize=9)
            ax.set_xlabel("bandwidth (Mbit/s)")
            ax.set_ylabel("measured latency (ms)")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("edgesplit bench split: measured end-to-end latency (numbers: intermediate cut chosen)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

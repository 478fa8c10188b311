"""How well a link probe reads a tbf-shaped link from a CPU-throttled device: a diagnostic.

``python -m edgesplit.bench.probe_timing [--json PATH] [--rates 1.5,3,6] [--device pizero2]``
(root: it builds the test bed's namespaces and CPU quota). A device process under the
device class's quota sends MobileNetV2-sized probes (about 6 and 25 kB, int8 and fp32 of
one tensor) to an edge node over a tbf link, and each probe's reading is compared with the
shaped rate, for three ways of timing it:

- ``pair``: the int8 call, then the fp32 call after its answer; the extra bytes over the
  extra time, both timed by the device (the embedded controller's probe until 2026-12-07);
- ``train_answers``: both sent back to back; the fp32 bytes over the gap between the two
  answers as the device saw them;
- ``train_stamps``: both sent back to back; the fp32 bytes over the gap between the two
  arrivals as the node stamped them (the probe since);

with the device either ``idle`` or ``beside`` its own work: a head's full compute right
before the probe and another starting one benchmark pause (two CFS periods) into it, as in
``edgesplit bench controller`` where a probe goes right after an answer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

METHODS = ("pair", "train_answers", "train_stamps")
MODES = ("idle", "beside")
EDGE_PORT = 8001


def device_side(target: str) -> None:
    """The device process: JSON commands on stdin (``{"mode", "n"}``), readings on stdout."""
    import torch

    from edgesplit.models import build_model
    from edgesplit.runtime.control.controller import probe_payloads
    from edgesplit.runtime.device.failover import send_train
    from edgesplit.runtime.transport.client import EdgeClient

    torch.manual_seed(0)
    model = build_model("mobilenet_v2").eval()
    client = EdgeClient(target)
    x = torch.randn(1, *model.input_shape)
    name, (small, large) = probe_payloads(model)  # what the embedded controller sends
    gain_bits = {"pair": 8 * (len(large.data) - len(small.data)), "train_answers": 8 * len(large.data),
                 "train_stamps": 8 * len(large.data)}

    def compute() -> None:
        with torch.no_grad():
            model(x)

    def gap(method: str) -> float:
        if method == "pair":
            a, b = (client.infer(name, p, 10.0, "probe") for p in (small, large))
            return (b.round_trip_seconds - b.edge_seconds) - (a.round_trip_seconds - a.edge_seconds)
        a, b = send_train(client, name, [small, large], 10.0, "probe").answers
        if method == "train_answers":
            return (b.round_trip_seconds - b.edge_seconds) - (a.round_trip_seconds - a.edge_seconds)
        return b.edge_arrival_s - a.edge_arrival_s

    for _ in range(3):  # the connection up and warm
        gap("train_stamps")
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("op") == "quit":
            break
        readings = {}
        for method in METHODS:
            readings[method] = []
            for _ in range(cmd["n"]):
                if cmd["mode"] == "beside":
                    compute()
                    later = threading.Thread(target=lambda pause=cmd["pause_s"]: (time.sleep(pause), compute()))
                    later.start()
                    seconds = gap(method)
                    later.join()
                else:
                    time.sleep(0.2)
                    seconds = gap(method)
                readings[method].append(gain_bits[method] / seconds / 1e6 if seconds > 0 else float("inf"))
        print(json.dumps(readings), flush=True)


def run(rates: list[float], device: str, n: int) -> dict:
    from edgesplit.bench.split import TBF_LATENCY_S, tbf_burst
    from edgesplit.partitioner.explain import DEVICE_QUOTAS
    from edgesplit.runtime.node.launcher import NodeProcess
    from edgesplit.testbed.bed import Testbed
    from edgesplit.testbed.cgroups import smooth_period_us

    q = DEVICE_QUOTAS[device]
    pause_s = 2 * smooth_period_us(q) / 1e6
    work = Path(tempfile.mkdtemp(prefix="edgesplit-probe-timing-"))
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {1})
    rows = []
    try:
        with Testbed(hosts={"device": "198.18.0.1", "edge1": "198.18.0.11"}) as bed:
            node = NodeProcess(model="mobilenet_v2", host=bed.address("edge1"), port=EDGE_PORT, metrics_port=-1,
                               threads=1, command_prefix=[*bed.exec_prefix("edge1"), "taskset", "-c", "1"],
                               extra_args=["--random-weights", "--workers", "1"], log_path=work / "edge.log",
                               startup_timeout=300)
            with node:
                quota = bed.cpu_quota("device", 1.0, smooth_period_us(1.0))
                proc = bed.exec("device", ["taskset", "-c", "0", sys.executable, "-m", "edgesplit.bench.probe_timing",
                                           "--device-side", f"{bed.address('edge1')}:{EDGE_PORT}"],
                                cpu=quota, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=open(work / "device.log", "w"), text=True)
                try:
                    if "ready" not in json.loads(proc.stdout.readline() or "{}"):
                        raise SystemExit(f"the device process did not start: see {work / 'device.log'}")
                    bed.cpu_quota(quota, q, smooth_period_us(q))
                    for mbit in rates:
                        bed.shape("device", mbit, burst=tbf_burst(mbit), latency=TBF_LATENCY_S)
                        for mode in MODES:
                            proc.stdin.write(json.dumps({"mode": mode, "n": n, "pause_s": pause_s}) + "\n")
                            proc.stdin.flush()
                            readings = json.loads(proc.stdout.readline())
                            for method, values in readings.items():
                                rows.append({"mbit": mbit, "mode": mode, "method": method,
                                             "median_ratio": statistics.median(values) / mbit,
                                             "min_ratio": min(values) / mbit, "max_ratio": max(values) / mbit,
                                             "readings_mbit": values})
                finally:
                    if proc.stdin:
                        proc.stdin.write('{"op": "quit"}\n')
                        proc.stdin.flush()
                    proc.wait(60)
    finally:
        os.sched_setaffinity(0, affinity)
    return {"device": device, "cpu_quota": q, "pause_s": pause_s, "probes_per_cell": n, "rows": rows,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the readings here")
    parser.add_argument("--rates", default="1.5,3,6", help="tbf rates in Mbit/s, comma-separated")
    parser.add_argument("--device", default="pizero2", help="device class (its CPU quota)")
    parser.add_argument("-n", type=int, default=12, help="probes per rate, mode and method")
    parser.add_argument("--device-side", metavar="TARGET", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device_side:
        device_side(args.device_side)
        return 0
    if os.geteuid() != 0:
        raise SystemExit("this diagnostic builds network namespaces and CPU quotas: run it as root")
    rates = [float(r) for r in args.rates.split(",")]
    result = run(rates, args.device, args.n)
    print(f"{'Mbit/s':>7} {'device':>7} " + " ".join(f"{m:>14}" for m in METHODS) + "   (median reading / rate)")
    for mbit in rates:
        for mode in MODES:
            cells = {r["method"]: r["median_ratio"] for r in result["rows"] if r["mbit"] == mbit and r["mode"] == mode}
            print(f"{mbit:>7g} {mode:>7} " + " ".join(f"{cells[m]:>14.2f}" for m in METHODS))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

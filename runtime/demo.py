"""``edgesplit demo``: a local cluster on loopback with the shipped model, a link that follows a
real bandwidth trace, the embedded controller choosing the plan, and a node failure.

It starts an ``edge-node`` process and puts the device's link to it behind the link
emulator (:mod:`edgesplit.linksim`) replaying a bandwidth trace (an excerpt of a real 3G
trace, shipped). The device is the ``mcu`` class by default, emulated by time (each block
takes 20 times as long, :mod:`.device.slowed`), so that offloading pays when the link is up
and does not when it dips. The embedded controller starts all on the device, measures the
link on real requests (and light probes while it offloads nothing) and changes the plan
(cut, exit thresholds from a calibration on 300 held-out images, codec) as the bandwidth
moves; each change is printed with the estimate that triggered it. Halfway the node is
killed with SIGKILL and restarted. Then the same trace is replayed under two fixed plans,
all on the device and all on the edge, for the comparison.

It prints accuracy, exits, where requests ran under each plan, the latency breakdown, the
mean latency against the fixed plans, and the count of requests answered, which equals the
count sent.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import torch
from tqdm import tqdm

from edgesplit.linksim import LinkEmulatorThread, LinkSettings
from edgesplit.linksim.traces import load_trace
from edgesplit.models import load_trained
from edgesplit.models.datasets import load_images, to_tensor
from edgesplit.partitioner.explain import DEVICE_QUOTAS

from .control.controller import Decision, EmbeddedController
from .control.estimators import LinkEstimator
from .control.exits import SAMPLE_CALIBRATION_IMAGES, calibrate_on_sample
from .control.policy import Hysteresis, LeastLatency, PlanSpace
from .device.runner import WHERE_EDGE, Answer, DeviceRunner
from .device.slowed import slowed
from .node.launcher import NodeProcess
from .plan import NEVER, Plan
from .transport.client import EdgeClient

DEMO_TRACE = Path(__file__).with_name("data") / "demo-trace.txt"


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


def describe(plan_cut: int, codec: str, thresholds: dict[int, float], last: int) -> str:
    """A plan in words: where it cuts, which exits fire on the device, the codec."""
    where = "all on the device" if plan_cut == last else "all on the edge" if plan_cut == 0 else f"cut {plan_cut}"
    held = {c: t for c, t in thresholds.items() if c <= plan_cut and t < NEVER}
    exits = ", ".join(f"exit@{c} >= {t:g}" for c, t in sorted(held.items())) or "no exits"
    return f"{where}, {exits}" + ("" if plan_cut == last else f", {codec}")


class NodeFailure:
    """Kills the node with SIGKILL before request ``kill_at`` and restarts it (in a thread, on
    the same port) before ``restart_at``; notes when the first offloaded answer follows."""

    def __init__(self, node: NodeProcess, kill_at: int, restart_at: int,
                 say: Callable[[str], None] | None = None) -> None:
        self.node, self.kill_at, self.restart_at = node, kill_at, restart_at
        self.events: list[str] = []
        self._say = say
        self._thread: threading.Thread | None = None
        self._restored_at: float | None = None
        self._back = False
        self.error: BaseException | None = None

    def before(self, i: int) -> None:
        if i == self.kill_at:
            self.node.kill()
            self._event(f"request {i}: edge-node killed with SIGKILL")
        if i == self.restart_at:
            self._thread = threading.Thread(target=self._restart, name="node-restart", daemon=True)
            self._thread.start()
            self._event(f"request {i}: edge-node restarting on the same port")

    def _restart(self) -> None:
        try:
            self.node.start()
            self._restored_at = time.monotonic()
        except BaseException as exc:  # surfaced by join()
            self.error = exc

    def after(self, i: int, answer: Answer) -> None:
        if self._restored_at is not None and not self._back and answer.where == WHERE_EDGE:
            self._back = True
            self._event(f"request {i}: first offloaded answer "
                        f"{time.monotonic() - self._restored_at:.2f} s after the node came back")

    def _event(self, line: str) -> None:
        self.events.append(line)
        if self._say:
            self._say(line)

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise self.error


def _drive(runner: DeviceRunner, x: torch.Tensor, rate_hz: float, desc: str, progress: bool,
           before: Callable[[int], None] | None = None,
           after: Callable[[int, Answer], None] | None = None) -> list[Answer]:
    """Send ``x`` one input at a time at ``rate_hz``; the answers, in order."""
    answers = []
    started = time.monotonic()
    for i in tqdm(range(len(x)), desc=desc, disable=not progress, unit="req", leave=False):
        if rate_hz > 0:
            time.sleep(max(0.0, started + i / rate_hz - time.monotonic()))
        if before:
            before(i)
        answer = runner.infer(x[i : i + 1])
        answers.append(answer)
        if after:
            after(i, answer)
    return answers


def run_demo(
    samples: int = 300,
    cut: int | None = None,
    threshold: float = 0.9,
    codec: str = "int8",
    deadline_s: float = 1.0,
    kill: bool = True,
    rate_hz: float = 25.0,
    progress: bool = True,
    device: str = "mcu",
    trace: str | Path | None = None,
    delay_ms: float = 2.0,
    compare: bool = True,
) -> dict:
    """Run the demo and return its summary (see :func:`summarise`, plus ``plans``,
    ``decisions`` and ``compare``).

    Requests arrive at ``rate_hz`` (a camera's frame rate; 0: as fast as possible), so the
    restarted node has time to come back while the run goes on. ``cut`` given: a fixed plan
    (cut, ``threshold`` at every exit the head holds, ``codec``) instead of the controller.
    ``device``: the device class (``pi4``, ``pizero2``, ``mcu``), emulated by time.
    ``trace``: a ``<seconds> <Mbit/s>`` file replayed on the link (default: the shipped
    excerpt), with ``delay_ms`` of one-way delay. ``compare``: replay the trace again under
    all on the device and all on the edge.
    """
    if device not in DEVICE_QUOTAS:
        raise ValueError(f"unknown device class {device!r}; choose one of {sorted(DEVICE_QUOTAS)}")
    if samples < 1 or samples > 1000 - SAMPLE_CALIBRATION_IMAGES:
        raise ValueError(f"samples must be within 1..{1000 - SAMPLE_CALIBRATION_IMAGES} (the shipped sample holds "
                         f"1,000 images; {SAMPLE_CALIBRATION_IMAGES} calibrate the exits)")
    if not rate_hz >= 0 or not deadline_s > 0 or not delay_ms >= 0:
        raise ValueError(f"need --rate >= 0, --deadline > 0 and --delay >= 0 (got {rate_hz}, {deadline_s}, {delay_ms})")
    torch.set_num_threads(1)
    model = load_trained("resnet_fm")
    last = model.num_blocks
    if cut is not None:
        model.check_cut(cut)
    images, labels = load_images("sample")
    x = to_tensor(images[SAMPLE_CALIBRATION_IMAGES : SAMPLE_CALIBRATION_IMAGES + samples])
    ys = [int(v) for v in labels[SAMPLE_CALIBRATION_IMAGES : SAMPLE_CALIBRATION_IMAGES + samples]]
    quota = DEVICE_QUOTAS[device]
    device_model = slowed(model, quota)
    bandwidth = load_trace(trace or DEMO_TRACE)
    events: list[str] = []
    decisions: list[Decision] = []
    compared: dict[str, dict] = {}

    def say(line: str) -> None:
        events.append(line)
        if progress:
            tqdm.write(f"  {line}")

    space, target = None, 0.0
    if cut is None:  # before the node starts, so its start does not slow the timing of the blocks
        table = calibrate_on_sample(model)
        space = PlanSpace.for_model(model, device_quota=quota, exit_settings=table)
        target = table[0].accuracy - 0.01
        say(f"device class {device} ({quota:g} of a core, emulated); exits calibrated on {SAMPLE_CALIBRATION_IMAGES} "
            f"images: " + ", ".join(f"{s.name} {100 * s.accuracy:.1f}%" for s in table)
            + f"; accuracy target {100 * target:.1f}%")
    with NodeProcess(model="resnet_fm", threads=1) as node, \
            LinkEmulatorThread(node.host, node.port, settings=LinkSettings(delay_ms=delay_ms)) as link:
        say(f"edge-node started on {node.address} (metrics on port {node.metrics_port}); the device reaches it "
            f"through the link emulator on port {link.port}: {delay_ms:g} ms each way, bandwidth replayed from "
            f"{Path(trace or DEMO_TRACE).name}")
        with closing(EdgeClient(f"127.0.0.1:{link.port}")) as client:
            controller = None
            if space is not None:
                runner = DeviceRunner(device_model, plan=Plan(cut=last, codec=codec), client=client,
                                      deadline_s=deadline_s)
                policy = Hysteresis(LeastLatency(accuracy_target=target), margin=0.1, hold=2)
                estimator = LinkEstimator(initial_mbit=1.0, initial_rtt_s=2 * delay_ms / 1e3)
                controller = EmbeddedController(runner, space, policy, estimator=estimator, every=4,
                                                probe_interval_s=1.0)
            else:
                runner = DeviceRunner(device_model, cut=cut, thresholds=threshold, client=client, codec=codec,
                                      deadline_s=deadline_s)
            failure = NodeFailure(node, len(ys) // 2, int(len(ys) * 0.6), say) if kill else None
            run_started = time.monotonic()

            def announce() -> None:
                """Print the controller's decisions made since the last call."""
                if controller is not None:
                    for d in controller.decisions_since(len(decisions)):
                        decisions.append(d)
                        trial = " (a trial: timing a cut the device has not run lately)" if d.explore else ""
                        deadline = ("" if d.offload_deadline_s is None
                                    else f", gives up offloading after {1000 * d.offload_deadline_s:.0f} ms")
                        say(f"{max(0.0, d.at - run_started):5.1f} s  plan {d.epoch}: "
                            f"{describe(d.cut, d.codec, d.thresholds, last)} ({d.predicted_ms:.0f} ms predicted"
                            f"{deadline}) at {d.bandwidth_mbit:.2f} Mbit/s, RTT {d.rtt_ms:.0f} ms{trial}")

            def after(i: int, answer: Answer) -> None:
                announce()
                if failure:
                    failure.after(i, answer)

            link.set_trace(bandwidth)
            if controller is not None:
                controller.decide()
                announce()
                controller.start_probing()
            try:
                answers = _drive(runner, x, rate_hz, "adaptive" if controller else "requests", progress,
                                    failure.before if failure else None, after)
            finally:
                if controller is not None:
                    controller.close()
                if failure:
                    failure.join()
            if compare:  # the same trace and the same node failure under each fixed plan
                fixed_plans = (("all on the device", Plan(cut=last)), ("all on the edge", Plan(cut=0, codec=codec)))
                for label, plan in fixed_plans:
                    fixed = DeviceRunner(device_model, plan=plan, client=client, deadline_s=deadline_s)
                    again = NodeFailure(node, failure.kill_at, failure.restart_at) if failure else None
                    link.set_trace(bandwidth)
                    try:
                        got = _drive(fixed, x, rate_hz, label, progress, again.before if again else None,
                                        again.after if again else None)
                    finally:
                        if again:
                            again.join()
                    compared[label] = {"mean_ms": 1000 * statistics.fmean(a.latency.total for a in got),
                                       "where": dict(Counter(a.where for a in got)),
                                       "accuracy": sum(a.prediction == y for a, y in zip(got, ys)) / len(ys)}
    summary = summarise(answers, ys, len(ys))
    plans: dict[int, dict] = {}
    for a in answers:
        entry = plans.setdefault(a.epoch, {"requests": 0, "where": Counter(), "ms": []})
        entry["requests"] += 1
        entry["where"][a.where] += 1
        entry["ms"].append(1000 * a.latency.total)
    described = {d.epoch: describe(d.cut, d.codec, d.thresholds, last) + (" (trial)" if d.explore else "")
                 for d in decisions}
    first = describe(last, codec, {}, last) if cut is None else describe(
        cut, codec, {c: threshold for c in model.exit_cuts}, last)
    for d in decisions:  # a plan replaced before any request ran under it is listed too, with none
        plans.setdefault(d.epoch, {"requests": 0, "where": Counter(), "ms": []})
    for epoch, entry in plans.items():
        entry["plan"] = described.get(epoch, first)
        entry["where"] = dict(entry["where"])
        ms = entry.pop("ms")
        entry["mean_ms"] = statistics.fmean(ms) if ms else None
    if compare:
        compared = {"adaptive" if controller else "this plan": {
            "mean_ms": summary["latency"]["total"]["mean_ms"], "where": summary["where"],
            "accuracy": summary["accuracy"]}, **compared}
    summary.update(cut=cut, threshold=threshold, codec=codec, rate_hz=rate_hz, device=device, events=events,
                   plans={str(k): v for k, v in sorted(plans.items())}, compare=compared,
                   decisions=[{"t": round(d.at - run_started, 3), "epoch": d.epoch, "cut": d.cut, "codec": d.codec,
                               "exits": d.exits, "bandwidth_mbit": d.bandwidth_mbit, "rtt_ms": d.rtt_ms,
                               "predicted_ms": d.predicted_ms} for d in decisions])
    return summary


def render_summary(s: dict) -> str:
    lines = ["", f"edgesplit demo: resnet_fm on Fashion-MNIST sample, a {s['device']}-class device runner + edge-node "
             "on loopback behind a trace-driven link", ""]
    lines += [f"  {e}" for e in s.get("events", [])]
    mode = "the embedded controller" if s["cut"] is None else (
        f"fixed plan: cut {s['cut']}, exit threshold {s['threshold']}, codec {s['codec']}")
    lines += [
        "",
        f"{mode}, {s['rate_hz']:g} requests/s",
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
    lines += ["", "where requests ran under each plan:"]
    for epoch, p in s["plans"].items():
        where = ", ".join(f"{w} {n}" for w, n in sorted(p["where"].items()))
        noun = "request" if p["requests"] == 1 else "requests"
        if not p["requests"]:
            lines.append(f"  plan {epoch}: {p['plan']}: no requests (replaced before the next one)")
            continue
        lines.append(f"  plan {epoch}: {p['plan']}: {p['requests']} {noun} ({where}), mean {p['mean_ms']:.1f} ms")
    lines += ["", f"{'latency':<10}{'mean ms':>10}{'p50 ms':>10}{'p99 ms':>10}"]
    for part, v in s["latency"].items():
        lines.append(f"{part:<10}{v['mean_ms']:>10.2f}{v['p50_ms']:>10.2f}{v['p99_ms']:>10.2f}")
    if s.get("compare"):
        lines += ["", "the same trace under fixed plans:", f"  {'plan':<20}{'mean ms':>10}{'accuracy':>10}  where"]
        for label, c in s["compare"].items():
            where = ", ".join(f"{w} {n}" for w, n in sorted(c["where"].items()))
            lines.append(f"  {label:<20}{c['mean_ms']:>10.1f}{100 * c['accuracy']:>9.1f}%  {where}")
    return "\n".join(lines)

"""The cluster controller and a device's link to it over the telemetry bus.

- :class:`Controller` (``edgesplit controller``): receives telemetry, keeps each device's
  state (link estimate, battery) and each node's load (queue depth, segment times, from
  ``edge-node --telemetry``), runs the same policies as the embedded controller per device
  (offloading plans pay the least loaded node's expected queue wait), publishes a decision
  when the choice changes and repeats the decisions in force every ``heartbeat_s``.
- :class:`DeviceLink` (on the device): publishes the embedded controller's estimates and
  battery every ``interval_s``, applies the controller's decisions between requests, and
  when nothing is heard for ``silence_s`` hands the choice back to the embedded controller
  (the device keeps its last plan meanwhile). A decision the device cannot run (a cut
  outside its model, an unknown codec, a threshold that is not a number >= 0) is counted
  and ignored: it neither changes the plan nor counts as hearing from a controller.

Both sides keep bounded state: the controller at most ``max_devices`` devices and nodes
(forgetting silent ones when a new one needs room) and the last ``HISTORY`` decisions per
device; the device link the last ``HISTORY`` decisions it applied.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from edgesplit.protos import telemetry_pb2
from edgesplit.runtime import codec as codecs
from edgesplit.runtime.logs import log_to_stderr
from edgesplit.runtime.metrics import ControllerMetrics
from edgesplit.runtime.plan import NEVER

from .bus import ControllerSockets, DecisionSubscriber, TelemetryPublisher, decision
from .controller import EmbeddedController
from .policy import Hysteresis, Option, PlanSpace, Policy, State

log = logging.getLogger(__name__)

HISTORY = 100  # decisions kept per device (controller) and applied decisions kept (device)
MAX_BANDWIDTH_MBIT = 100_000.0  # telemetry beyond these is refused as malformed
MAX_RTT_S = 60.0
FORGET_AFTER_HEARTBEATS = 10  # a device silent this long may be forgotten when a new one needs room


MAX_NODE_SEGMENTS = 4096  # segment times one node's telemetry may carry


@dataclass
class NodeView:
    """What the controller knows of one edge node's load."""

    queue_depth: int
    wait_s: float  # expected wait of a new request (see :func:`expected_wait_s`)
    heard_at: float


def expected_wait_s(queue_depth: int, segment_seconds) -> float:
    """Expected wait of a new request at a node: the queue served one at a time at the mean
    segment time (pessimistic: batching serves several at once). Computed once per message:
    every device decision reads it."""
    times = [t for t in segment_seconds if t > 0]
    return queue_depth * (sum(times) / len(times)) if times else 0.0


@dataclass
class DeviceView:
    """What the controller knows of one device."""

    state: State
    heard_at: float
    policy: Policy
    current: Option | None = None
    epoch: int = 0
    decisions: collections.deque[dict] = field(default_factory=lambda: collections.deque(maxlen=HISTORY))


class Controller:
    """Decides for every device that sends telemetry."""

    def __init__(self, sockets: ControllerSockets, space_for: Callable[[str], PlanSpace],
                 policy_for: Callable[[str], Policy], heartbeat_s: float = 1.0, name: str = "controller",
                 clock: Callable[[], float] = time.monotonic, max_devices: int = 1024,
                 metrics: ControllerMetrics | None = None) -> None:
        if not heartbeat_s > 0:  # NaN fails too: a controller that never repeats its decisions
            raise ValueError(f"heartbeat_s must be a positive number of seconds, not {heartbeat_s}")
        self.sockets = sockets
        self.metrics = metrics
        self.space_for = space_for
        self.policy_for = policy_for
        self.heartbeat_s = heartbeat_s
        self.name = name
        self.clock = clock
        self.max_devices = max_devices
        self.devices: dict[str, DeviceView] = {}
        self.nodes: dict[str, NodeView] = {}
        self._spaces: dict[str, PlanSpace] = {}
        self._last_beat = clock()
        self._swept: dict[str, float] = {}  # when each full table was last swept for silent entries

    def step(self, timeout_s: float = 0.1) -> None:
        for msg in self.sockets.poll(timeout_s):
            self.handle(msg)
        now = self.clock()
        if now - self._last_beat >= self.heartbeat_s:
            self.sockets.republish()
            self._last_beat = now
        if self.metrics:
            self.metrics.malformed.set(self.sockets.malformed)
            self.metrics.devices.set(len(self.devices))
            self.metrics.nodes.set(len(self.nodes))

    def edge_wait_s(self) -> float:
        """The expected queue wait at the least loaded node heard from in the last 3 heartbeats
        (0 when none is): devices offload to whichever node answers, so the best one counts."""
        fresh = [n.wait_s for n in self.nodes.values() if self.clock() - n.heard_at <= 3 * self.heartbeat_s]
        return min(fresh) if fresh else 0.0

    def handle_node(self, msg: telemetry_pb2.Telemetry) -> None:
        name = msg.source.removeprefix("node/")
        load = msg.node
        if (load.queue_depth < 0 or len(load.segment_seconds) > MAX_NODE_SEGMENTS
                or any(not 0 <= t < 3600 for t in load.segment_seconds.values())):
            self.sockets.malformed += 1
            return
        if name not in self.nodes and len(self.nodes) >= self.max_devices and self._may_sweep("nodes"):
            now = self.clock()  # make room by forgetting nodes not heard from in 3 heartbeats
            self.nodes = {k: v for k, v in self.nodes.items() if now - v.heard_at <= 3 * self.heartbeat_s}
        if name not in self.nodes and (len(self.nodes) >= self.max_devices or not 0 < len(name) <= 128):
            self.sockets.malformed += 1
            return
        if self.metrics:
            self.metrics.telemetry.labels(kind="node").inc()
        self.nodes[name] = NodeView(load.queue_depth, expected_wait_s(load.queue_depth, load.segment_seconds.values()),
                                    self.clock())

    def handle(self, msg: telemetry_pb2.Telemetry) -> None:
        if msg.source.startswith("node/") and msg.HasField("node"):
            self.handle_node(msg)
            return
        if not msg.source.startswith("device/") or not msg.HasField("link"):
            return
        name = msg.source.removeprefix("device/")
        link = msg.link
        battery = msg.battery if msg.HasField("battery") else telemetry_pb2.Battery(level=1.0)
        # Comparisons written so that NaN fails them: an infinite bandwidth or a NaN battery
        # would make every option's cost NaN and the choice arbitrary.
        if not (0 < link.bandwidth_mbit <= MAX_BANDWIDTH_MBIT and 0 <= link.rtt_seconds <= MAX_RTT_S
                and 0 <= battery.level <= 1):
            self.sockets.malformed += 1
            return
        state = State(link.bandwidth_mbit, link.rtt_seconds, battery.level, battery.on_battery, self.edge_wait_s())
        view = self.devices.get(name)
        if view is None:
            if len(self.devices) >= self.max_devices and self._may_sweep("devices"):
                self._forget_silent_devices()
            if len(self.devices) >= self.max_devices or not 0 < len(name) <= 128:
                self.sockets.malformed += 1  # a flood of invented names must not grow the controller
                return
            view = self.devices[name] = DeviceView(state, self.clock(), Hysteresis(self.policy_for(name)))
            self._spaces[name] = self.space_for(name)
        view.state, view.heard_at = state, self.clock()
        if self.metrics:
            self.metrics.telemetry.labels(kind="device").inc()
            self.metrics.bandwidth.labels(device=name).set(state.bandwidth_mbit * 1e6)
            self.metrics.rtt.labels(device=name).set(state.rtt_s)
            self.metrics.battery.labels(device=name).set(state.battery_level)
        if link.samples == 0:
            # Nothing measured yet: the estimate is the device's starting guess. Deciding on it
            # sent fresh devices to offload everything on a link never seen; the device's own
            # controller starts all on the device and probes, and decides until this one can.
            # A device that restarted measures afresh too: the decision made for its earlier
            # life is no longer replayed to it (nor repeated by the heartbeat).
            if view.current is not None:
                view.current = None
                view.policy = Hysteresis(self.policy_for(name))
                self.sockets.forget(name)
            return
        option = view.policy.choose(self._spaces[name].options(state), state)
        if view.current is not None and option.key == view.current.key:
            return
        view.current = option
        view.epoch += 1
        reason = (f"{state.bandwidth_mbit:.2f} Mbit/s, RTT {1000 * state.rtt_s:.1f} ms, battery "
                  f"{100 * state.battery_level:.0f}%{' on battery' if state.on_battery else ''}"
                  + (f", edge queue {1000 * state.edge_wait_s:.0f} ms" if state.edge_wait_s else ""))
        self.sockets.publish_decision(decision(name, view.epoch, option.cut, option.codec,
                                               dict(option.exits.thresholds), reason, option.latency_s, self.name,
                                               option.exits.confidence))
        view.decisions.append({"epoch": view.epoch, "cut": option.cut, "codec": option.codec, "reason": reason})
        if self.metrics:
            self.metrics.decisions.inc()
            self.metrics.plan_cut.labels(device=name).set(option.cut)
            self.metrics.plan_epoch.labels(device=name).set(view.epoch)
        log.info("%s: plan %d: cut %d, codec %s (%s)", name, view.epoch, option.cut, option.codec, reason)

    def _may_sweep(self, table: str) -> bool:
        """At most one sweep of a full table per heartbeat: a flood of invented names must not
        buy a scan of the table each."""
        now = self.clock()
        if now - self._swept.get(table, -math.inf) < self.heartbeat_s:
            return False
        self._swept[table] = now
        return True

    def _forget_silent_devices(self) -> None:
        """Make room by forgetting devices not heard from in ``FORGET_AFTER_HEARTBEATS`` heartbeats
        (a device that comes back is decided for afresh)."""
        horizon = self.clock() - FORGET_AFTER_HEARTBEATS * self.heartbeat_s
        for name in [k for k, v in self.devices.items() if v.heard_at < horizon]:
            del self.devices[name]
            self._spaces.pop(name, None)
            self.sockets.forget(name)
            if self.metrics:
                self.metrics.forget(name)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.step(0.1)


class DeviceLink:
    """A device's side of the bus: telemetry out, decisions in, embedded fallback on silence."""

    def __init__(self, embedded: EmbeddedController, publisher: TelemetryPublisher, subscriber: DecisionSubscriber,
                 interval_s: float = 0.5, silence_s: float = 3.0) -> None:
        self.embedded = embedded
        self.runner = embedded.runner
        self.publisher = publisher
        self.subscriber = subscriber
        self.interval_s = interval_s
        self.silence_s = silence_s
        self.applied: collections.deque[telemetry_pb2.Decision] = collections.deque(maxlen=HISTORY)
        self.applied_count = 0
        self.rejected = 0
        self.kept_thresholds = 0  # decisions applied whose thresholds were for another confidence or other exits
        self._keeps_thresholds = False  # the decision _plan_of read last
        self.reconnects = 0
        self.fallbacks = 0
        self.following = False  # a controller is deciding for this device
        self._heard_at: float | None = None
        self._last_key: tuple | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def start(self) -> DeviceLink:
        for target, name in ((self._publish_loop, "edgesplit-telemetry"), (self._follow_loop, "edgesplit-decisions")):
            thread = threading.Thread(target=self._guarded(target), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _guarded(self, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # surfaced by close()
                self.errors.append(exc)
                log.exception("%s failed", threading.current_thread().name)

        return run

    def telemetry(self) -> telemetry_pb2.Telemetry:
        est = self.embedded.estimator.estimate
        reading = self.embedded.battery_reading(self.embedded.clock())
        self.embedded.show_state(State(est.bandwidth_mbit, est.rtt_s, reading.level, reading.on_battery))
        msg = telemetry_pb2.Telemetry(
            link=telemetry_pb2.LinkObservation(bandwidth_mbit=est.bandwidth_mbit, rtt_seconds=est.rtt_s,
                                               samples=est.samples, drops=est.drops),
            battery=telemetry_pb2.Battery(level=reading.level, on_battery=reading.on_battery,
                                          simulated=self.embedded.battery is not None))
        try:
            import psutil
        except ImportError:
            return msg
        msg.resources.cpu_percent = psutil.cpu_percent(None)  # since the previous call: the last interval
        msg.resources.memory_bytes = psutil.Process().memory_info().rss
        return msg

    def _publish_loop(self) -> None:
        # The first at once: a restarted device tells the controller it has measured nothing
        # yet (so its earlier life's decision is dropped) as soon as it can, not interval_s later.
        while True:
            self.publisher.publish(self.telemetry())
            if self._stop.wait(self.interval_s):
                return

    def _follow_loop(self) -> None:
        quiet_since = reconnected_at = time.monotonic()
        while not self._stop.is_set():
            msg = self.subscriber.receive(timeout_s=0.1)
            now = time.monotonic()
            plan = self._plan_of(msg) if msg is not None else None
            if plan is not None:
                self._heard_at = quiet_since = now
                resumed = not self.following
                if resumed:
                    self.following = True
                    self.embedded.deciding = False
                # Heartbeats repeat the decision in force; a new one differs in epoch, sender or
                # content (a restarted controller counts its epochs from 1 again). On resuming,
                # the decision is applied even if it is the one applied before the silence: the
                # embedded controller may have changed the plan (or be trying a cut).
                key = (msg.epoch, msg.controller, msg.cut, msg.codec, tuple(sorted(msg.thresholds.items())))
                if resumed or key != self._last_key:
                    self.runner.set_plan(plan)
                    self.applied.append(msg)
                    self.applied_count += 1
                    self.kept_thresholds += self._keeps_thresholds
                    self._last_key = key
                    if self.runner.metrics:  # plan changes the device made, whoever decided them
                        self.runner.metrics.decisions.inc()
                continue
            if self.following and self._heard_at is not None and now - self._heard_at > self.silence_s:
                self.following = False
                self.embedded.deciding = True  # the last plan stays until the embedded one decides
                self.fallbacks += 1
                log.warning("no decision for %.1f s: the embedded controller decides again", self.silence_s)
            if now - quiet_since > self.silence_s and now - reconnected_at > self.silence_s:
                # ZeroMQ reconnects a dropped connection by itself, but not one it closed for a
                # protocol error (an oversized message): a fresh socket recovers from both.
                self.subscriber.reconnect()
                self.reconnects += 1
                reconnected_at = now

    def _plan_of(self, msg: telemetry_pb2.Decision):
        """The runner's plan changed as ``msg`` decides, or None (counted) when it cannot run it."""
        model = self.runner.model
        thresholds = {c: float(msg.thresholds.get(c, NEVER)) for c in model.exit_cuts}
        if (not 0 <= msg.cut <= model.num_blocks or msg.codec not in codecs.CODECS
                or not all(t >= 0 for t in thresholds.values())):  # NaN fails too
            self.rejected += 1
            if self.rejected == 1 or self.rejected % 1000 == 0:  # a flood of them must not flood the log
                log.warning("ignored %d decision(s) this device cannot run; the latest: cut %d, codec %.32r, "
                            "thresholds %s", self.rejected, msg.cut, msg.codec,
                            {c: t for c, t in thresholds.items() if not t >= 0})
            return None
        # Thresholds calibrated on another confidence, or for exits at other cuts (a bundle's
        # own heads), mean something else here: the cut and codec are followed, the device's
        # own thresholds kept. An empty map is a decision too: no exits.
        kind = msg.confidence or "max_softmax"
        self._keeps_thresholds = bool(msg.thresholds) and (
            kind != self.runner.confidence_kind or not set(msg.thresholds) <= set(model.exit_cuts))
        if self._keeps_thresholds:
            if not self.kept_thresholds:
                log.warning("the controller's exit thresholds are for %s confidence at exits %s; this device measures "
                            "%s at exits %s: it keeps its own thresholds", kind, sorted(msg.thresholds),
                            self.runner.confidence_kind, list(model.exit_cuts))
            thresholds = dict(self.runner.plan.thresholds)
        # The decision carries no offload deadline: the runner's own applies, not one an
        # embedded controller set for another cut.
        return self.runner.plan.with_changes(cut=msg.cut, codec=msg.codec, thresholds=thresholds,
                                             offload_deadline_s=None)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        if self.errors:
            raise self.errors[0]


def policy_named(name: str, slo_s: float, accuracy_target: float, low_battery: float) -> Policy:
    """The policies ``edgesplit controller --policy`` offers."""
    from .policy import BatteryAware, LeastEnergy, LeastLatency, MostAccurate

    if name == "latency":
        return LeastLatency(accuracy_target)
    if name == "energy":
        return LeastEnergy(slo_s, accuracy_target)
    if name == "accuracy":
        return MostAccurate(slo_s)
    if name == "battery":
        return BatteryAware(LeastLatency(accuracy_target), LeastEnergy(slo_s, accuracy_target), low_battery)
    raise ValueError(f"unknown policy {name!r}; choose latency, energy, accuracy or battery")


def serve(model_name: str, device_quota: float, telemetry: str, decisions: str, policy: str = "battery",
          slo_s: float = 0.2, accuracy_target: float = 0.0, low_battery: float = 0.3, heartbeat_s: float = 1.0,
          curve_dir: str | None = None, port_file: str | None = None, stop: threading.Event | None = None,
          metrics_port: int = -1, metrics_host: str = "127.0.0.1") -> int:
    """Run a controller until ``stop`` is set (or SIGTERM / Ctrl-C); its metrics on
    ``metrics_host:metrics_port`` (0: any free port, written to the port file; -1: none)."""
    import json
    import os
    import signal

    import zmq

    from edgesplit.models import load_trained

    from .bus import CurveKeys
    from .endpoint import check_endpoint
    from .exits import calibrate_on_sample

    if not (heartbeat_s > 0 and slo_s > 0 and 0 <= accuracy_target <= 1 and 0 <= low_battery <= 1):  # NaN fails
        raise ValueError(f"need heartbeat and SLO > 0, accuracy target and low battery in 0..1; got "
                         f"{heartbeat_s}, {slo_s}, {accuracy_target}, {low_battery}")
    check_endpoint(telemetry, "--telemetry", bind=True)  # before the model loads: a typo fails at once
    check_endpoint(decisions, "--decisions", bind=True)
    keys = clients = None
    if curve_dir:
        keys = CurveKeys.load(curve_dir, "controller")
        clients = CurveKeys.public_keys(curve_dir)
    log_to_stderr()
    model = load_trained(model_name)
    # Calibrated exits: without them every decision carried empty thresholds, which switched
    # off the exits of every device that followed, and an accuracy target was met by anything.
    space = PlanSpace.for_model(model, device_quota=device_quota, exit_settings=calibrate_on_sample(model))
    metrics = http = None
    if metrics_port >= 0:  # before the bus: a port already taken fails with nothing to undo
        from prometheus_client import CollectorRegistry

        from edgesplit.runtime.metrics_http import MetricsServer

        metrics = ControllerMetrics(CollectorRegistry())
        http = MetricsServer(metrics.registry, metrics_port, metrics_host)
    ctx = zmq.Context()
    try:
        sockets = ControllerSockets(ctx, telemetry, decisions, keys, clients)
    except BaseException:
        if http:
            http.close()
        ctx.term()
        raise
    controller = Controller(sockets, lambda _: space, lambda _: policy_named(policy, slo_s, accuracy_target,
                                                                                 low_battery), heartbeat_s,
                            metrics=metrics)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    try:
        if port_file:
            with open(port_file + ".tmp", "w") as f:
                json.dump({"telemetry": sockets.telemetry_endpoint, "decisions": sockets.decision_endpoint,
                           "metrics_port": http.port if http else -1}, f)
            os.replace(port_file + ".tmp", port_file)
        admitted = f", CURVE admitting {len(clients)} client keys" if clients is not None else ""
        where = f", metrics on {metrics_host}:{http.port}" if http else ""
        print(f"controller: telemetry on {sockets.telemetry_endpoint}, decisions on {sockets.decision_endpoint}, "
              f"policy {policy}, {model_name} on a {device_quota:g}-core device, "
              f"{len(space.exit_settings)} exit settings{admitted}{where}", flush=True)
        controller.run(stop)
    finally:
        sockets.close()
        ctx.term()
        if http:
            http.close()
    return 0

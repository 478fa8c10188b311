"""The embedded controller: runs a policy inside the device runner, no extra process.

It watches every answer the runner gives (``runner.observers``): offloaded requests feed
the link estimator with their real bytes and timings, every request drains the (possibly
simulated) battery by the energy the cost model charges it. Every ``every`` answers, or at
once when the estimator sees a sharp drop, it asks the policy for the best option under
the current state and, if that differs from the plan in force, swaps in a new plan (next
epoch) between requests. Each change is recorded with the estimate that triggered it.

Every answer also times the device itself: its device time against what the plan space's
profile predicted for that path feeds a :class:`~.estimators.DeviceTimeEstimator`, and the
policy sees the profile scaled by what was learned (per cut where known). A start-up
profile taken under a CPU quota can be a third off for a whole run; the requests
themselves are the better measurement.

While the plan keeps everything on the device nothing is offloaded and the link goes
unobserved: :meth:`probe` sends a pair of real requests that differ only in size (the
same tensor as int8 and as fp32) and takes the bandwidth from their difference;
:meth:`start_probing` does that in a thread whenever no offload was seen for the probe
interval. A probe costs a weak device real CPU time, so while probes change nothing the
interval doubles, up to ``max_probe_interval_s``; a plan change (by this controller or a
cluster controller) or an offload resets it, and a device following a cluster controller
does not back off (its telemetry is what that controller decides on).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from edgesplit.partitioner.cost import PI4, DevicePower, Link
from edgesplit.runtime import codec as codecs
from edgesplit.runtime.device.runner import WHERE_EDGE, WHERE_FALLBACK, Answer, DeviceRunner
from edgesplit.runtime.inference import OffloadError
from edgesplit.runtime.plan import NEVER, Plan

from .battery import BatteryReading, SimulatedBattery, system_battery
from .estimators import DeviceTimeEstimator, LinkEstimator
from .policy import Option, PlanSpace, Policy, State

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """A plan change and why."""

    at: float
    epoch: int
    cut: int
    codec: str
    exits: str
    thresholds: dict
    predicted_ms: float
    bandwidth_mbit: float
    rtt_ms: float
    battery_level: float
    on_battery: bool
    device_scale: float = 1.0  # learned device time over the profile's, at the chosen cut


class EmbeddedController:
    """Chooses the runner's plan from what its own requests observe."""

    def __init__(self, runner: DeviceRunner, space: PlanSpace, policy: Policy,
                 estimator: LinkEstimator | None = None, battery: SimulatedBattery | None = None,
                 every: int = 8, power: DevicePower = PI4, clock: Callable[[], float] = time.monotonic,
                 probe_interval_s: float = 2.0, max_probe_interval_s: float | None = None,
                 device_times: DeviceTimeEstimator | None = None, learn_device_time: bool = True) -> None:
        self.runner = runner
        self.space = space
        self.policy = policy
        self.estimator = estimator or LinkEstimator()
        self.battery = battery
        self.every = every
        self.power = power
        self.clock = clock
        self.probe_interval_s = probe_interval_s
        self.max_probe_interval_s = 8 * probe_interval_s if max_probe_interval_s is None else max_probe_interval_s
        if self.max_probe_interval_s < probe_interval_s:
            raise ValueError(f"max_probe_interval_s ({self.max_probe_interval_s}) < probe_interval_s "
                             f"({probe_interval_s})")
        self.probe_wait_s = probe_interval_s
        self.probes = 0
        self.device_times = device_times or DeviceTimeEstimator()
        self.learn_device_time = learn_device_time
        self.decisions: list[Decision] = []
        self.current: Option | None = None
        self.deciding = True  # False while a cluster controller decides for this device (remote.DeviceLink)
        self._seen = 0
        self._moves = 0  # the estimator's drops + rises seen so far
        self._last_offload_at = clock()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        runner.observers.append(self.observe)

    # -- state ---------------------------------------------------------------------------
    def battery_reading(self, at: float) -> BatteryReading:
        if self.battery is not None:
            return self.battery.reading(at)
        return system_battery() or BatteryReading(1.0, False)

    def state(self, at: float | None = None) -> State:
        """What the controller knows now (the link, the battery, the device's learned time)."""
        with self._lock:
            return self._state(at)

    def _state(self, at: float | None = None) -> State:  # the caller holds the lock
        at = self.clock() if at is None else at
        reading = self.battery_reading(at)
        est = self.estimator.estimate
        scales = self.device_times.scales() if self.learn_device_time else {}
        overall = self.device_times.overall() if self.learn_device_time else 1.0
        return State(est.bandwidth_mbit, est.rtt_s, reading.level, reading.on_battery,
                     device_scale=overall, device_scales=scales)

    # -- observing -----------------------------------------------------------------------
    def observe(self, answer: Answer) -> None:
        at = self.clock()
        with self._lock:
            lat = answer.latency
            if answer.where == WHERE_EDGE and answer.sent_bytes:
                answer_bytes = 4 * answer.logits.numel() if answer.logits is not None else 0
                self.estimator.observe(answer.sent_bytes, lat.transfer + lat.edge, lat.edge, at, answer_bytes)
                self._last_offload_at = at
            elif answer.attempted_bytes and (answer.offload_error or "").startswith("DEADLINE_EXCEEDED"):
                # The bytes did not get through in time: the link is at most this fast.
                self.estimator.observe_timeout(answer.attempted_bytes, lat.transfer, at)
            if self.learn_device_time:
                self._observe_device_time(answer)
            if self.battery is not None:
                link = Link(self.estimator.bandwidth_mbit, self.estimator.rtt_s)
                self.battery.drain(self.power.energy_joules(lat.device, lat.transfer, link), at)
            self._seen += 1
            moves = self.estimator.drops + self.estimator.rises
            moved = moves != self._moves
            self._moves = moves
            if self.deciding and (moved or self._seen % self.every == 0):
                self._decide(at)

    def _observe_device_time(self, answer: Answer) -> None:
        plan = self.runner.plan
        if answer.where == WHERE_FALLBACK or answer.epoch != plan.epoch:
            return  # a local completion is not the plan's path; an older plan's exits are unknown here
        exit_cut = int(answer.exit.split("@", 1)[1]) if answer.exit.startswith("exit@") else None
        ran = plan.active_exits(exits=self.runner.model.exit_cuts)
        predicted = self.space.device_seconds(answer.cut, exit_cut, ran)
        self.device_times.observe(answer.cut, answer.latency.device, predicted)
        metrics = self.runner.metrics
        if metrics:
            metrics.device_time_scale.set(self.device_times.scale(answer.cut))

    def decide(self) -> Plan | None:
        """Decide now (also done every ``every`` answers); the new plan, or None if unchanged."""
        with self._lock:
            return self._decide(self.clock())

    def _decide(self, at: float) -> Plan | None:
        state = self._state(at)
        option = self.policy.choose(self.space.options(state), state)
        self.current = option
        plan = self.runner.plan
        thresholds = {cut: option.exits.thresholds.get(cut, NEVER) for cut in self.runner.model.exit_cuts}
        if (option.cut, option.codec, thresholds) == (plan.cut, plan.codec, {
                c: plan.threshold(c) for c in self.runner.model.exit_cuts}):
            return None
        new = plan.with_changes(cut=option.cut, codec=option.codec, thresholds=thresholds)
        self.runner.set_plan(new)
        decision = Decision(at, new.epoch, new.cut, new.codec, option.exits.name, thresholds,
                            1000 * option.latency_s, state.bandwidth_mbit, 1000 * state.rtt_s,
                            state.battery_level, state.on_battery, state.device_scale_at(new.cut))
        self.decisions.append(decision)
        metrics = self.runner.metrics
        if metrics:
            metrics.decisions.inc()
            metrics.bandwidth.set(state.bandwidth_mbit * 1e6)
            metrics.rtt.set(state.rtt_s)
            metrics.battery.set(state.battery_level)
            metrics.on_battery.set(1 if state.on_battery else 0)
        log.info("plan %d: cut %d, codec %s, exits %s (%.1f ms predicted) at %.2f Mbit/s, RTT %.1f ms, "
                 "device %.2fx its profile, battery %.0f%%%s", new.epoch, new.cut, new.codec, option.exits.name,
                 decision.predicted_ms, state.bandwidth_mbit, decision.rtt_ms, decision.device_scale,
                 100 * state.battery_level, " on battery" if state.on_battery else "")
        return new

    # -- probing -------------------------------------------------------------------------
    def probe(self, timeout: float = 2.0, elements: int = 8192) -> bool:
        """Measure the link with two real requests while nothing is offloaded; False if one failed.

        Both carry the same zeros to the same tail (the cut whose tensor is nearest
        ``elements`` in size), once as int8 and once as fp32: their difference in time is
        three bytes per element at the link's rate, free of the RTT and the node's work.
        """
        client = self.runner.client
        if client is None:
            return False
        model = self.runner.model
        with self._lock:
            self.probes += 1
        points = model.cut_points()
        cut = min(range(1, model.num_blocks), key=lambda k: abs(points[k].numel - elements))
        tensor = torch.zeros(1, *points[cut].shape)
        name = DeviceRunner.tail_model_name_for(model, cut)
        timed = []
        for codec_name in ("int8", "fp32"):
            encoded = codecs.encode(tensor, codec_name)
            started = time.perf_counter()
            try:
                result = client.infer(name, encoded, timeout, "probe")
            except OffloadError:
                return False
            timed.append((len(encoded.data), time.perf_counter() - started - result.edge_seconds))
        at = self.clock()
        with self._lock:
            (small, small_s), (large, large_s) = timed
            self.estimator.observe_pair(small, small_s, large, large_s, at)
            self._last_offload_at = at
        return True

    def start_probing(self) -> None:
        """Probe in a thread whenever no offload was seen for the probe interval (which
        doubles while probes change nothing, up to ``max_probe_interval_s``)."""

        def loop() -> None:
            last_seen_offload, last_epoch = self._last_offload_at, self.runner.plan.epoch
            while not self._stop.wait(self.probe_interval_s / 4):
                # Real offloads measure the link, and a new plan (whoever made it) may need it.
                if self._last_offload_at != last_seen_offload or self.runner.plan.epoch != last_epoch:
                    self.probe_wait_s = self.probe_interval_s
                last_seen_offload, last_epoch = self._last_offload_at, self.runner.plan.epoch
                if self.clock() - self._last_offload_at < self.probe_wait_s:
                    continue
                measured = self.probe()
                if measured and self.deciding:
                    self.decide()
                # Back off only while probes change nothing here; a device following a cluster
                # controller keeps its telemetry fresh for it instead.
                moved = self.runner.plan.epoch != last_epoch or not self.deciding
                self.probe_wait_s = (self.probe_interval_s if moved
                                      else min(2 * self.probe_wait_s, self.max_probe_interval_s))
                last_seen_offload, last_epoch = self._last_offload_at, self.runner.plan.epoch

        self._thread = threading.Thread(target=loop, name="edgesplit-probe", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.observe in self.runner.observers:
            self.runner.observers.remove(self.observe)

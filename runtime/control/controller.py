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
unobserved: :meth:`probe` sends two real requests back to back (a tensor as int8, then as
fp32) and takes the bandwidth from the gap between their arrivals at the node (the node
stamps each answer with when its request arrived), so the device's own CPU, which may be
busy with a request when the answers come, is not in the timing;
:meth:`start_probing` does that in a thread once at the start (the first plans then rest
on a measured link, not on the estimator's initial guess) and whenever no offload was seen
for the probe interval, provided some answer since the last offload was given without one
(a plan that offloads every request measures the link with each, however sparse the
requests: a probe between them only queues its 40 kB in front of the next request, which a
benchmark run at 0.3 Mbit/s measured as about 1 s added to such requests). A probe costs a
weak device real CPU time, so while probes change nothing the interval doubles, up to
``max_probe_interval_s``; and a due probe waits for the runner's next answer (at most the
probe interval) and goes right after it, in the pause before the next request rather than
at any moment, where it could take CPU from a request running beside it (in four benchmark
runs of five at 0.15 of a core, the adaptive runner's requests all on the device took
1.2-2.7 ms longer on average than those of a fixed plan doing the same, in the same
rounds). A plan change (by this controller or a cluster controller) or an offload resets
the interval, a probe that read the link far from the estimate (a change the estimator
waits to see confirmed) is followed by one at the base interval, and a device following a
cluster controller does not back off (its telemetry is what that controller decides on).

The device's time is only learned at the cuts it runs; elsewhere the profile is scaled by
the ratio seen overall where it says slower, at most by the time it added spread over that
cut's longer run, and where it says faster only by what runs at least as long as that
cut's showed (see :class:`~.estimators.DeviceTimeEstimator`), which can be wrong for one
cut (a quota splits some heads' work across more scheduler periods than others). So the
controller **explores**: when the plan in force stays, and another cut the device has not
timed recently is predicted within ``explore_margin`` of it in the policy's objective
(energy for a least-energy policy, else latency; and within the policy's latency SLO, if it
has one), it runs that cut for
``device_times.min_samples`` requests (a plan of its own, with its own epoch, recorded as a
decision with ``explore=True``; the decision that follows it has ``ends_trial=True``), then
decides again with that cut's own ratio learned. At most once every ``explore_every``
answers, so a cut that stays close costs about ``min_samples / explore_every`` of the
requests at most ``explore_margin`` slower; a trial that taught nothing (its requests failed
over, left at an exit, or were too short to time) is not repeated at that cut until
``device_times.max_stale_after`` answers later.

Every plan the controller makes carries an **offload deadline**: ``offload_patience`` times
the predicted offload (sending, the edge's work, the answer), at least
``min_offload_deadline_s``. Past it the runner races the offload with the tail on the device
(:class:`~edgesplit.runtime.device.runner.DeviceRunner`, ``race``), so starting the tail
early loses nothing but device work; a runner that does not race abandons the offload at
the deadline, and then the deadline also includes what completing the request on the
device would cost (the tail after the cut, scaled as cuts not yet run are). A request caught
by a link that collapses mid-flight (a trace's drop to 0.05 Mbit/s turned one 9 kB offload
into 2 s) then completes locally by the deadline plus the tail instead of waiting the link
out; its timeout enters the estimator as an upper bound on the rate. When the option in
force stays but the deadline it wants moves by more than ``DEADLINE_SLACK`` (the link
changed within the hysteresis), the plan is remade with the new deadline (a decision like
any other). A plan set by a cluster controller has none: the runner's own deadline applies.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from edgesplit.models.split_model import SplitModel
from edgesplit.partitioner.cost import PI4, DevicePower, Link
from edgesplit.runtime import codec as codecs
from edgesplit.runtime.device.runner import WHERE_EDGE, WHERE_FALLBACK, Answer, DeviceRunner
from edgesplit.runtime.inference import OffloadError
from edgesplit.runtime.plan import NEVER, Plan

from .battery import BatteryReading, SimulatedBattery, system_battery
from .estimators import DeviceTimeEstimator, LinkEstimator
from .policy import LeastEnergy, Option, PlanSpace, Policy, State, active_policy

log = logging.getLogger(__name__)

DECISION_HISTORY = 1000  # decisions an embedded controller keeps (None in the constructor: all)
DEADLINE_SLACK = 1.5  # a plan is remade when the offload deadline it wants is off by more than this factor
SYSTEM_BATTERY_READ_S = 5.0  # the machine's battery is read (through psutil, from /sys) at most this often
EDGE_EXTRA_WINDOW = 16  # offloaded answers whose edge time beyond the profile is kept (their median is used)
# Older ones are forgotten: a plan moved onto the device by a slow edge offloads no more and
# would otherwise keep the slowness for good; forgotten, the edge is tried again.
EDGE_EXTRA_MAX_AGE_S = 30.0


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
    device_scale: float = 1.0  # what the policy scaled the profile by at the chosen cut (DeviceTimeEstimator.scale)
    explore: bool = False  # a trial of a cut whose device time is not learned, not the policy's choice
    ends_trial: bool = False  # the policy's decision right after a trial (often back to the plan before it)
    offload_deadline_s: float | None = None  # the plan's own (None: the runner's)
    edge_extra_ms: float = 0.0  # the edge's learned time beyond its profile, per offload (State.edge_wait_s)


@dataclass
class _Trial:
    epoch: int  # of the trial plan
    cut: int
    left: int  # answers it still needs


def probe_payloads(model: SplitModel, elements: int = 8192) -> tuple[str, list[codecs.EncodedTensor]]:
    """The tail a link probe of about ``elements`` goes to (the cut whose tensor is nearest
    that size) and its zeros encoded as int8 and as fp32, the two requests of a probe."""
    points = model.cut_points()
    cut = min(range(1, model.num_blocks), key=lambda k: abs(points[k].numel - elements))
    tensor = torch.zeros(1, *points[cut].shape)
    return (DeviceRunner.tail_model_name_for(model, cut),
            [codecs.encode(tensor, codec_name) for codec_name in ("int8", "fp32")])


class EmbeddedController:
    """Chooses the runner's plan from what its own requests observe."""

    def __init__(self, runner: DeviceRunner, space: PlanSpace, policy: Policy,
                 estimator: LinkEstimator | None = None, battery: SimulatedBattery | None = None,
                 every: int = 8, power: DevicePower = PI4, clock: Callable[[], float] = time.monotonic,
                 probe_interval_s: float = 2.0, max_probe_interval_s: float | None = None,
                 device_times: DeviceTimeEstimator | None = None, learn_device_time: bool = True,
                 explore_margin: float = 0.25, explore_every: int = 24,
                 offload_patience: float | None = 2.0, min_offload_deadline_s: float = 0.2,
                 history: int | None = DECISION_HISTORY) -> None:
        mismatched = {s.confidence for s in space.exit_settings if s.thresholds} - {runner.confidence_kind}
        if mismatched:
            raise ValueError(f"the plan space's exit thresholds were calibrated on {', '.join(sorted(mismatched))} "
                             f"confidence, the runner measures {runner.confidence_kind}: make the runner with "
                             f"confidence_kind={sorted(mismatched)[0]!r} or calibrate for its kind")
        self.runner = runner
        self.space = space
        self.policy = policy
        self.estimator = estimator or LinkEstimator()
        self.battery = battery
        self._system_battery: tuple[float, BatteryReading] | None = None  # (read at, reading)
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
        self.probe_checks = 0  # times the probe thread looked whether to probe
        self.device_times = device_times or DeviceTimeEstimator()
        self.learn_device_time = learn_device_time
        if explore_margin < 0 or explore_every < 1:
            raise ValueError(f"need explore_margin >= 0 and explore_every >= 1, not {explore_margin}, {explore_every}")
        self.explore_margin = explore_margin
        self.explore_every = explore_every
        if offload_patience is not None and not offload_patience >= 1:
            raise ValueError(f"offload_patience must be at least 1 (or None: no deadline of the plan's own), "
                             f"not {offload_patience}")
        if not 0 < min_offload_deadline_s < math.inf:
            raise ValueError(f"min_offload_deadline_s must be a positive number of seconds, "
                             f"not {min_offload_deadline_s}")
        self.offload_patience = offload_patience
        self.min_offload_deadline_s = min_offload_deadline_s
        self.explorations = 0
        self._trial: _Trial | None = None
        self._explored_at = -explore_every  # self._seen when the last trial began
        self._barren: dict[int, int] = {}  # cut -> self._seen when a trial there taught nothing
        self._confirming = False  # the next probe comes at the base interval (see start_probing)
        if history is not None and history < 1:
            raise ValueError(f"history must be at least 1 decision (or None: keep every one), not {history}")
        # The latest ``history`` decisions (a device runs for months: an unbounded log grows
        # with every plan change); ``decision_count`` counts them all.
        self.decisions: collections.deque[Decision] = collections.deque(maxlen=history)
        self.decision_count = 0
        self.current: Option | None = None
        self.deciding = True  # False while a cluster controller decides for this device (remote.DeviceLink)
        self._seen = 0
        self._moves = 0  # the estimator's drops + rises seen so far
        # Seconds each recent offload's edge compute (the node's edge_compute_seconds: its
        # run of the tail, or of the batch it rode in) took beyond the edge profile's time for
        # that tail: the profile is timed in-process, and the node's worker ran resnet_fm in
        # 2.6 ms against 1.5 profiled (a whole offload was predicted at 3.2 ms and took 5.9; the
        # controller kept that plan for a whole window against a 4 ms device).
        self._edge_extra: collections.deque[tuple[float, float]] = collections.deque(maxlen=EDGE_EXTRA_WINDOW)
        self._last_offload_at = clock()
        # Whether an answer was given without an offload since the last offload (True at the
        # start: nothing offloaded yet). Probes run only then: a plan that offloads every
        # request measures the link with each one, however sparse the requests (probes between
        # them only queue bytes in front of the next).
        self._unoffloaded = True
        self._lock = threading.Lock()
        # Held while probing: hold it to keep probes out of a stretch of time (a benchmark that
        # interleaves another runner's requests with this device's does, so probes load only
        # this device's own turns).
        self.probe_lock = threading.Lock()
        self._answered = threading.Event()  # set by every answer: a due probe waits for one
        self.awaiting_answer = False  # a due probe is waiting for the runner's next answer
        self.last_wait_answered: bool | None = None  # whether the last such wait ended with an answer
        self._probe_payloads: dict[int, tuple[str, list]] = {}  # elements -> (tail, [as int8, as fp32])
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        runner.observers.append(self.observe)

    # -- state ---------------------------------------------------------------------------
    def battery_reading(self, at: float) -> BatteryReading:
        if self.battery is not None:
            return self.battery.reading(at)
        # (a negative age: a clock set back, or a reading stored by the telemetry thread with a
        # later timestamp than this caller's: read again, it only costs a read)
        if self._system_battery is None or not 0 <= at - self._system_battery[0] < SYSTEM_BATTERY_READ_S:
            self._system_battery = (at, system_battery() or BatteryReading(1.0, False))
        return self._system_battery[1]

    def state(self, at: float | None = None) -> State:
        """What the controller knows now (the link, the battery, the device's learned time)."""
        with self._lock:
            return self._state(at)

    def _state(self, at: float | None = None) -> State:  # the caller holds the lock
        at = self.clock() if at is None else at
        reading = self.battery_reading(at)
        est = self.estimator.estimate
        scales = self.device_times.scales() if self.learn_device_time else {}
        unseen = self.device_times.unseen_scale() if self.learn_device_time else 1.0
        carried = self.device_times.carried_scales(
            {cut: self.space.device_seconds(cut) for cut in self.space.allowed_cuts if cut not in scales}
        ) if self.learn_device_time else {}
        return State(est.bandwidth_mbit, est.rtt_s, reading.level, reading.on_battery,
                     edge_wait_s=self._edge_extra_at(at), device_scale=unseen, device_scales=scales,
                     unseen_scales=carried)

    def edge_extra_s(self, at: float | None = None) -> float:
        """The median time recent offloads spent at the edge beyond its profile (those older
        than EDGE_EXTRA_MAX_AGE_S at ``at`` forgotten; 0 when none is left)."""
        with self._lock:
            return self._edge_extra_at(self.clock() if at is None else at)

    def _edge_extra_at(self, at: float) -> float:  # the caller holds the lock
        while self._edge_extra and at - self._edge_extra[0][0] > EDGE_EXTRA_MAX_AGE_S:
            self._edge_extra.popleft()
        extra = sorted(x for _, x in self._edge_extra)
        if not extra:
            return 0.0
        mid = len(extra) // 2
        return extra[mid] if len(extra) % 2 else (extra[mid - 1] + extra[mid]) / 2

    # -- observing -----------------------------------------------------------------------
    def observe(self, answer: Answer) -> None:
        try:
            self._observe(answer)
        finally:
            self._answered.set()  # a probe waiting for an answer goes now, even if this one failed

    def _observe(self, answer: Answer) -> None:
        at = self.clock()
        with self._lock:
            lat = answer.latency
            if answer.where == WHERE_EDGE and answer.sent_bytes:
                answer_bytes = 4 * answer.logits.numel() if answer.logits is not None else 0
                if not answer.cold:  # a round trip that opened the connection does not time the link
                    self.estimator.observe(answer.sent_bytes, lat.transfer + lat.edge, lat.edge, at, answer_bytes)
                    profiled = self.space.edge.segment_seconds(answer.cut, self.space.last)
                    self._edge_extra.append((at, max(0.0, lat.edge - profiled)))
                self._last_offload_at = at
                self._unoffloaded = False
            else:
                self._unoffloaded = True
                if (answer.attempted_bytes and not answer.cold
                        and (answer.offload_error or "").startswith("DEADLINE_EXCEEDED")):
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
            trial_over = self._trial_answered(answer)
            if not self.deciding:
                self._trial = None
            elif moved or trial_over or (self._trial is None and self._seen % self.every == 0):
                ended = self._trial is not None
                self._trial = None
                self._decide(at, ends_trial=ended)

    def _trial_answered(self, answer: Answer) -> bool:
        """Count an answer of the trial plan in force; True when the trial has all it needs."""
        if self._trial is None:
            return False
        trial = self._trial
        if self.runner.plan.epoch != trial.epoch:
            self._trial = None  # someone else changed the plan: the trial is over, unfinished
            return False
        if answer.epoch == trial.epoch:  # counted even if it taught nothing: a trial always ends
            trial.left -= 1
        if trial.left > 0:
            return False
        if trial.cut not in self.device_times.scales():
            self._barren[trial.cut] = self._seen
        return True

    def _observe_device_time(self, answer: Answer) -> None:
        plan = self.runner.plan
        if answer.where == WHERE_FALLBACK or answer.raced or answer.epoch != plan.epoch:
            # a local completion (or a race with one) is not the plan's path; an older plan's
            # exits are unknown here
            return
        exit_cut = int(answer.exit.split("@", 1)[1]) if answer.exit.startswith("exit@") else None
        ran = plan.active_exits(exits=self.runner.model.exit_cuts)
        predicted = self.space.device_seconds(answer.cut, exit_cut, ran)
        self.device_times.observe(answer.cut, answer.latency.device, predicted)
        metrics = self.runner.metrics
        if metrics:
            metrics.device_time_scale.set(self.device_times.scale(answer.cut, predicted))

    def decisions_since(self, count: int) -> list[Decision]:
        """The decisions made after the first ``count`` (those the history still holds), oldest first."""
        with self._lock:
            kept = list(self.decisions)
            first = self.decision_count - len(kept)  # the number of the oldest decision kept
        return kept[max(0, count - first):]

    def decide(self) -> Plan | None:
        """Decide now (also done every ``every`` answers); the new plan, or None if unchanged.

        Not while a trial is in force: its own answers end it (the probe thread decides after
        every probe, and put the policy's plan back before a trial had its answers: in a
        benchmark run 9 of 17 trials got 0 or 1 of their 2 and taught nothing). A sharp move
        of the link still ends a trial, through the answers that see it."""
        with self._lock:
            if self._trial is not None and self.runner.plan.epoch == self._trial.epoch:
                return None
            return self._decide(self.clock())

    def show_state(self, state: State) -> None:
        """Set the estimate and battery gauges (each decision round, and each telemetry tick of a
        device a cluster controller decides for: they were set only on plan changes, so they
        went stale while the plan held)."""
        metrics = self.runner.metrics
        if metrics:
            metrics.bandwidth.set(state.bandwidth_mbit * 1e6)
            metrics.rtt.set(state.rtt_s)
            metrics.battery.set(state.battery_level)
            metrics.on_battery.set(1 if state.on_battery else 0)

    def _decide(self, at: float, ends_trial: bool = False) -> Plan | None:
        # This decision sees every move of the link so far: only a later one may end the trial
        # it starts (the probe thread decides on a move its probe saw, then the next answer,
        # often of the plan before, would count the same move again and end the trial at once:
        # in a benchmark run a trial at cut 8 began on a rise to 4.4 Mbit/s and was over 0.1 s
        # later, without an answer).
        self._moves = self.estimator.drops + self.estimator.rises
        state = self._state(at)
        self.show_state(state)
        options = self.space.options(state)
        option = self.policy.choose(options, state)
        self.current = option
        plan = self.runner.plan
        explore = False
        if self._runs(option, plan):
            trial = self._trial_option(option, options, state)
            if trial is None:
                if not self._deadline_stale(plan, self._offload_deadline(option, state)):
                    return None
            else:
                option, explore = trial, True
        thresholds = self._thresholds(option)
        new = plan.with_changes(cut=option.cut, codec=option.codec, thresholds=thresholds,
                                offload_deadline_s=self._offload_deadline(option, state))
        self.runner.set_plan(new)
        if explore:
            self.explorations += 1
            self._explored_at = self._seen
            self._trial = _Trial(new.epoch, new.cut, self.device_times.min_samples)
        decision = Decision(at, new.epoch, new.cut, new.codec, option.exits.name, thresholds,
                            1000 * option.latency_s, state.bandwidth_mbit, 1000 * state.rtt_s,
                            state.battery_level, state.on_battery, state.device_scale_at(new.cut), explore,
                            ends_trial and not explore, new.offload_deadline_s, 1000 * state.edge_wait_s)
        self.decisions.append(decision)
        self.decision_count += 1
        metrics = self.runner.metrics
        if metrics:
            metrics.decisions.inc()
        log.info("plan %d%s: cut %d, codec %s, exits %s (%.1f ms predicted) at %.2f Mbit/s, RTT %.1f ms, "
                 "device %.2fx its profile, battery %.0f%%%s", new.epoch, " (trial)" if explore else "", new.cut,
                 new.codec, option.exits.name,
                 decision.predicted_ms, state.bandwidth_mbit, decision.rtt_ms, decision.device_scale,
                 100 * state.battery_level, " on battery" if state.on_battery else "")
        return new

    def _offload_deadline(self, option: Option, state: State) -> float | None:
        """How long ``option``'s offloads may take before completing locally (see the module
        docstring); None for all on the device, without ``offload_patience``, or where the
        prediction is not a number."""
        if self.offload_patience is None or not option.remote_s > 0:
            return None
        seconds = self.offload_patience * option.remote_s
        if not self.runner.races_late_offloads:
            # giving up forfeits the offload: wait as long again as completing here would take
            # (the tail is not the head: the head's learned ratio says little about it; a
            # slowdown is carried to it as to a cut not run, for a run of the tail's length)
            tail_s = self.space.local_tail_seconds(option.cut)
            scale = self.device_times.unseen_scale(tail_s) if self.learn_device_time else state.device_scale
            seconds += scale * tail_s
        return max(self.min_offload_deadline_s, seconds) if math.isfinite(seconds) else None

    def _deadline_stale(self, plan: Plan, wanted: float | None) -> bool:
        """Whether the plan in force should be remade for its offload deadline alone: it has
        none where one is wanted (a plan set by hand or by a cluster controller, now chosen
        by this one) or one off by more than ``DEADLINE_SLACK`` (the link moved, the option
        stayed: a deadline set for a faster link would send every request back to the
        device, one for a slower link would wait out a collapse)."""
        have = plan.offload_deadline_s
        if wanted is None or have is None:
            return wanted != have
        return not (1 / DEADLINE_SLACK <= wanted / have <= DEADLINE_SLACK)

    def _thresholds(self, option: Option) -> dict[int, float]:
        return {cut: option.exits.thresholds.get(cut, NEVER) for cut in self.runner.model.exit_cuts}

    def _runs(self, option: Option, plan: Plan) -> bool:
        """Whether ``plan`` is ``option`` already."""
        return (option.cut, option.codec, self._thresholds(option)) == (
            plan.cut, plan.codec, {c: plan.threshold(c) for c in self.runner.model.exit_cuts})

    def _trial_option(self, chosen: Option, options: list[Option], state: State) -> Option | None:
        """A cut worth timing on the device: not learned, predicted within ``explore_margin``
        of ``chosen`` in the deciding policy's objective (energy for :class:`LeastEnergy`,
        else latency) and within its SLO, the best such; None if none, if the last trial was
        too recent, or if ``chosen``'s own time is not learned yet (it is what the trial is
        measured against)."""
        if (not self.learn_device_time or self.explore_margin <= 0 or chosen.cut not in state.device_scales
                or self._seen - self._explored_at < self.explore_every):
            return None
        rule = active_policy(self.policy, state)
        slo_s = getattr(rule, "slo_s", math.inf)
        objective = "energy_j" if isinstance(rule, LeastEnergy) else "latency_s"
        bound = 1 + self.explore_margin
        barren_for = self.device_times.max_stale_after
        close = [o for o in options
                 if o.cut != chosen.cut and o.cut not in state.device_scales and o.exits == chosen.exits
                 and self._seen - self._barren.get(o.cut, -barren_for) >= barren_for
                 and self.space.device_seconds(o.cut) >= self.device_times.min_predicted_s
                 and getattr(o, objective) <= bound * getattr(chosen, objective)
                 and (o.latency_s <= slo_s or o.latency_s <= chosen.latency_s)]
        return min(close, key=lambda o: (getattr(o, objective), o.latency_s)) if close else None

    # -- probing -------------------------------------------------------------------------
    def probe(self, timeout: float = 2.0, elements: int = 8192) -> bool:
        """Measure the link with two real requests while nothing is offloaded; False if one failed.

        Both carry the same zeros to the same tail (the cut whose tensor is nearest
        ``elements`` in size), first as int8, then as fp32 sent right behind it without
        waiting for its answer: the second reached the node one fp32 tensor's time on the
        link after the first. The node says when each arrived; from a node that does not,
        the gap between the answers (with its compute taken out) is used, which a device
        busy with its own work reads late. (Keep the two small: together within HTTP/2's
        first 64 kB window, so that neither waits for the node to open it.)
        """
        client = self.runner.client
        if client is None:
            return False
        with self._lock:
            self.probes += 1
        name, payloads = self._probe_payload(elements)
        with self.probe_lock:
            # A train sent while the connection opened waited for the handshakes, and then its
            # requests went in any order: it is sent again (once) over the connection it opened.
            for _attempt in range(2):
                try:
                    train = client.infer_train(name, payloads, timeout, "probe")
                except OffloadError:
                    return False
                first, second = train.answers
                if not (first.cold or second.cold):
                    break
            else:
                return False
        at = self.clock()
        small, large = (len(p.data) for p in payloads)
        lead_s = first.round_trip_seconds - first.edge_seconds
        total_s = second.round_trip_seconds - second.edge_seconds
        # Timed from the answers: back to back, the fp32 bytes took the gap between them; one
        # after the other, its extra bytes took its extra time.
        gap_bytes, gap_s = (large if train.back_to_back else large - small), total_s - lead_s
        if train.back_to_back and None not in (first.edge_arrival_s, second.edge_arrival_s, first.edge_clock) \
                and first.edge_clock == second.edge_clock:
            # no later than the second's own round trip: a node cannot make the link look slower
            gap_s = min(second.edge_arrival_s - first.edge_arrival_s, total_s)
        with self._lock:
            self.estimator.observe_train(small, lead_s, gap_bytes, gap_s, total_s, at)
            self._last_offload_at = at
        return True

    def _probe_payload(self, elements: int) -> tuple[str, list]:
        """The tail a probe of about ``elements`` goes to and its zeros as int8 and as fp32,
        encoded once (the same bytes every time: no device CPU spent remaking them)."""
        cached = self._probe_payloads.get(elements)
        if cached is None:
            cached = self._probe_payloads[elements] = probe_payloads(self.runner.model, elements)
        return cached

    def _await_answer(self) -> None:
        """Wait for the runner's next answer, at most the probe interval (a device that gets
        no requests is probed all the same); ``last_wait_answered`` says whether one came."""
        self._answered.clear()
        if self._stop.is_set():  # close() may have set the event just before it was cleared
            return
        self.awaiting_answer = True
        try:
            answered = self._answered.wait(self.probe_interval_s)  # close() sets it too
        finally:
            self.awaiting_answer = False
        self.last_wait_answered = answered and not self._stop.is_set()

    def start_probing(self, at_once: bool = True) -> None:
        """Probe in a thread whenever no offload was seen for the probe interval (which
        doubles while probes change nothing, up to ``max_probe_interval_s``).

        ``at_once``: the first probe comes now (unless a request offloaded already), so the
        first plans rest on a measured link rather than the estimator's initial guess."""

        def loop() -> None:
            last_seen_offload, last_epoch = self._last_offload_at, self.runner.plan.epoch
            first = at_once
            while first or not self._stop.wait(self.probe_interval_s / 4):
                due_now, first = first, False
                self.probe_checks += 1
                # Real offloads measure the link, and a new plan (whoever made it) may need it.
                if self._last_offload_at != last_seen_offload or self.runner.plan.epoch != last_epoch:
                    self.probe_wait_s = self.probe_interval_s
                last_seen_offload, last_epoch = self._last_offload_at, self.runner.plan.epoch
                # A probe that read the link far from the estimate (a change the estimator waits
                # to see twice) is followed by one at the base interval, not one 8 s later.
                wait = self.probe_interval_s if self._confirming else self.probe_wait_s
                if not self._unoffloaded or (not due_now and self.clock() - self._last_offload_at < wait):
                    continue
                if not due_now:
                    self._await_answer()
                    if self._stop.is_set():
                        break
                    if not self._unoffloaded:  # that answer offloaded: it measured the link
                        continue
                try:
                    measured = self.probe()
                except Exception:  # a client's own fault must not end probing for good
                    log.exception("probe failed")
                    measured = False
                # once: not after a failed probe, nor again after a confirming one
                self._confirming = measured and self.estimator.unconfirmed and not self._confirming
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
        self._answered.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.observe in self.runner.observers:
            self.runner.observers.remove(self.observe)

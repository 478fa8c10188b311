"""Policies: choose a plan (cut, exit thresholds, codec) from the cost model and the state.

A :class:`PlanSpace` holds what does not change while a device runs: per-block device and
edge times of its split model, the crossing tensor of every block cut, the exit settings
it may use (thresholds with their calibrated exit rates and accuracy) and the codecs. For
a :class:`State` (link estimate, battery) it predicts every option with the partitioner's
cost model (:func:`edgesplit.partitioner.cost.predict`, exits weighted by their rates).

Policies share one small interface, ``choose(options, state) -> Option``:

- :class:`LeastLatency`: least expected latency among options meeting an accuracy target;
- :class:`LeastEnergy`: least device energy among those meeting a latency SLO (and the
  accuracy target), the fastest if none does;
- :class:`MostAccurate`: most accurate option meeting the latency SLO (Edgent), the fastest
  if none does;
- :class:`BatteryAware`: one policy on mains power, another on battery below a level;
- :class:`Hysteresis`: keeps the current option unless another is better by a margin for
  ``hold`` decisions in a row, so decisions do not flap on a noisy estimate.

Example::

    >>> space = PlanSpace.uniform(blocks=4, device_block_s=0.01, edge_block_s=0.001,
    ...                           shapes=[(1, 8, 8)] + [(16, 8, 8)] * 3 + [(10,)])
    >>> fast, slow = State(bandwidth_mbit=100.0, rtt_s=0.001), State(bandwidth_mbit=0.01, rtt_s=0.05)
    >>> LeastLatency().choose(space.options(fast), fast).cut, LeastLatency().choose(space.options(slow), slow).cut
    (0, 4)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from edgesplit.partitioner.cost import CODEC_BYTES, INPUT_BYTES_PER_ELEMENT, PI4, DevicePower, Exit, Link, predict
from edgesplit.partitioner.cuts import GraphCut
from edgesplit.partitioner.profile import Profile


@dataclass(frozen=True)
class ExitSetting:
    """Thresholds for the exits, the share of inputs leaving at each, and the accuracy that gives."""

    thresholds: Mapping[int, float] = field(default_factory=dict)
    rates: Mapping[int, float] = field(default_factory=dict)  # exit cut -> share of all inputs
    accuracy: float = 1.0
    name: str = "no exits"
    # The confidence the thresholds apply to (edgesplit.models.split_model.CONFIDENCES): a
    # threshold calibrated on entropy means something else under max-softmax.
    confidence: str = "max_softmax"


@dataclass(frozen=True)
class State:
    """What the controller knows now."""

    bandwidth_mbit: float
    rtt_s: float
    battery_level: float = 1.0  # 0..1
    on_battery: bool = False
    edge_wait_s: float = 0.0  # expected wait in the edge's queue (from nodes' telemetry)
    # Observed over predicted device time (estimators.DeviceTimeEstimator): per cut where
    # learned; for the others ``unseen_scales`` where given (what was learned elsewhere,
    # carried to that cut), else ``device_scale``.
    device_scale: float = 1.0
    device_scales: Mapping[int, float] = field(default_factory=dict)
    unseen_scales: Mapping[int, float] = field(default_factory=dict)

    def device_scale_at(self, cut: int) -> float:
        learned = self.device_scales.get(cut)
        return learned if learned is not None else self.unseen_scales.get(cut, self.device_scale)


@dataclass(frozen=True)
class Option:
    """One plan with its predicted cost."""

    cut: int
    codec: str
    exits: ExitSetting
    latency_s: float
    energy_j: float
    accuracy: float
    # Predicted time of one offload that happens (sending, the edge's queue and work, the
    # answer back); 0 for all on the device. What an offload deadline is set from.
    remote_s: float = 0.0

    @property
    def key(self) -> tuple:
        return self.cut, self.codec, self.exits.name


class PlanSpace:
    """Every plan a device may run, and their predicted cost for a state."""

    def __init__(self, device: Profile, edge: Profile, shapes: Sequence[tuple[int, ...]],
                 exit_settings: Sequence[ExitSetting] = (), codecs: Sequence[str] = ("fp32", "fp16", "int8"),
                 power: DevicePower = PI4, exit_seconds: Mapping[int, float] | None = None,
                 allowed_cuts: Sequence[int] | None = None) -> None:
        if len(shapes) != len(device.node_names) + 1:
            raise ValueError(f"need one crossing shape per cut (0..{len(device.node_names)}), got {len(shapes)}")
        self.device = device
        self.edge = edge
        self.shapes = [tuple(s) for s in shapes]
        self.exit_settings = list(exit_settings) or [ExitSetting()]
        self._plain = next((s for s in self.exit_settings if not s.thresholds), None)  # "no exits", if offered
        self.codecs = tuple(codecs)
        self.power = power
        self.exit_seconds = dict(exit_seconds or {})
        last = len(self.shapes) - 1
        self.cuts = [GraphCut(k, "input" if k == 0 else device.node_names[k - 1], ("h",), ((1, *s),),
                              4 * math.prod(s), 0, True) for k, s in enumerate(self.shapes)]
        self.last = last
        # Cuts the policies may choose (default: all); e.g. only those whose device time was measured.
        self.allowed_cuts = set(range(last + 1)) if allowed_cuts is None else set(allowed_cuts)
        if not self.allowed_cuts or not self.allowed_cuts <= set(range(last + 1)):
            raise ValueError(f"allowed cuts must be some of 0..{last}, not {sorted(self.allowed_cuts)!r:.80}")
        one_byte = any(CODEC_BYTES[c] <= INPUT_BYTES_PER_ELEMENT for c in self.codecs)
        if not self.codecs or not (self.allowed_cuts - {0} or one_byte):
            raise ValueError("no plan to choose: cut 0 alone needs a one-byte codec (int8), as the image "
                             "crosses at a byte a pixel; allow another cut or add int8")

    @classmethod
    def uniform(cls, blocks: int, device_block_s: float, edge_block_s: float, shapes, **kwargs) -> PlanSpace:
        """A space of ``blocks`` equal blocks (for tests and examples)."""
        names = [f"block{i}" for i in range(blocks)]

        def profile(seconds: float) -> Profile:
            return Profile("uniform", "-", "-", 1, 1, names, {1: [seconds] * blocks})

        return cls(profile(device_block_s), profile(edge_block_s), shapes, **kwargs)

    @classmethod
    def for_model(cls, model, device_quota: float = 1.0, edge: Profile | None = None, repeats: int = 5,
                  **kwargs) -> PlanSpace:
        """A space for a ``SplitModel``: its blocks timed on this host (median of ``repeats``), the
        device as this host divided by ``device_quota``, the edge as this host unless given."""
        import torch

        from edgesplit.partitioner.profile import median_seconds

        names = list(model.block_names)
        h = torch.zeros(1, *model.input_shape)
        block_s, exit_s = [], {}
        with torch.inference_mode():
            for index, block in enumerate(model.blocks, start=1):
                block_s.append(median_seconds(lambda b=block, x=h: b(x), repeats))
                h = block(h)
                if index in model.exit_cuts:
                    exit_s[index] = median_seconds(lambda i=index, x=h: model.exit_logits(i, x), repeats) / device_quota
        host = Profile(model.name, "this host", torch.__version__, torch.get_num_threads(), 1, names, {1: block_s})
        device = Profile(model.name, "this host", torch.__version__, torch.get_num_threads(), 1, names,
                         {1: [t / device_quota for t in block_s]}, cpu_quota=device_quota)
        shapes = [c.shape for c in model.cut_points()[:-1]] + [(model.num_classes,)]
        return cls(device, edge or host, shapes, exit_seconds=exit_s, **kwargs)

    def device_seconds(self, cut: int, exit_cut: int | None = None, exits_run: Collection[int] = ()) -> float:
        """The profile's device time of one request under a plan at ``cut``: the head up to
        ``exit_cut`` when it left there, else the whole head and its encoding, plus the exit
        heads among ``exits_run`` on the way. What
        :class:`~.estimators.DeviceTimeEstimator` compares answers with."""
        stop = cut if exit_cut is None else exit_cut
        seconds = self.device.segment_seconds(0, stop)
        if exit_cut is None and cut < self.last:
            seconds += math.prod(self.shapes[cut]) * self.device.encode_seconds_per_element
        return seconds + sum(self.exit_seconds.get(c, 0.0) for c in exits_run if c <= stop)

    def local_tail_seconds(self, cut: int, device_scale: float = 1.0) -> float:
        """The device's time to run everything after ``cut`` itself (what completing a
        request locally costs when its offload fails), by the profile scaled by ``device_scale``."""
        return device_scale * self.device.segment_seconds(cut, self.last)

    def options(self, state: State) -> list[Option]:
        link = Link(state.bandwidth_mbit, state.rtt_s)
        plain = self._plain
        # Predictions only for the cuts that may be chosen (and the last, which predict() reads
        # as the model's end): the controller asks for options every few requests on the device.
        cuts = [c for c in self.cuts if c.index in self.allowed_cuts or c.index == self.last]
        out = []
        for setting in self.exit_settings:
            exits = [Exit(cut, rate, self.exit_seconds.get(cut, 0.0)) for cut, rate in setting.rates.items()]
            for codec in self.codecs:
                for p in predict(cuts, self.device, self.edge, link, codec=codec, power=self.power, exits=exits):
                    if p.cut not in self.allowed_cuts or (p.cut == self.last and codec != self.codecs[0]):
                        continue  # all on the device sends nothing: one codec is enough
                    if p.cut == 0 and CODEC_BYTES[codec] > INPUT_BYTES_PER_ELEMENT:
                        continue  # the model sends the image at a byte a pixel: only what the runtime sends so
                    if plain is not None and setting is not plain and all(c > p.cut for c in setting.thresholds):
                        continue  # the head holds none of its exits: the same plan as no exits
                    stays = 1.0 - sum(r for c, r in setting.rates.items() if c <= p.cut)
                    wait = state.edge_wait_s * stays if p.cut < self.last else 0.0
                    total_s, energy_j = p.total_s, p.energy_j
                    scale = state.device_scale_at(p.cut)
                    if scale != 1.0:  # the device runs slower (or faster) than its profile
                        total_s += (scale - 1.0) * p.device_s
                        energy_j = self.power.energy_joules(scale * p.device_s, p.transfer_s, link)
                    # predict() weighs transfer and edge time by the share that reaches them
                    remote_s = (p.transfer_s + p.edge_s) / stays + state.edge_wait_s if stays > 0 else 0.0
                    out.append(Option(p.cut, codec, setting, total_s + wait, energy_j, setting.accuracy,
                                      remote_s if p.cut < self.last else 0.0))
        return out


class Policy(ABC):
    """Chooses one option for a state."""

    @abstractmethod
    def choose(self, options: Sequence[Option], state: State) -> Option:
        """The option to run in ``state``."""


def _fastest(options: Sequence[Option]) -> Option:
    return min(options, key=lambda o: (o.latency_s, -o.cut))


def _accurate_enough(options: Sequence[Option], target: float) -> list[Option]:
    """The options meeting the accuracy ``target``; when none does, the most accurate ones
    (not all of them: the fastest of all was often the least accurate)."""
    good = [o for o in options if o.accuracy >= target]
    if good or not options:
        return good
    best = max(o.accuracy for o in options)
    return [o for o in options if o.accuracy == best]


@dataclass
class LeastLatency(Policy):
    accuracy_target: float = 0.0

    def choose(self, options, state):
        return _fastest(_accurate_enough(options, self.accuracy_target))


@dataclass
class LeastEnergy(Policy):
    slo_s: float
    accuracy_target: float = 0.0

    def choose(self, options, state):
        good = _accurate_enough(options, self.accuracy_target)
        within = [o for o in good if o.latency_s <= self.slo_s]
        return min(within, key=lambda o: (o.energy_j, o.latency_s)) if within else _fastest(good)


@dataclass
class MostAccurate(Policy):
    slo_s: float

    def choose(self, options, state):
        within = [o for o in options if o.latency_s <= self.slo_s]
        return max(within, key=lambda o: (o.accuracy, -o.latency_s)) if within else _fastest(options)


@dataclass
class BatteryAware(Policy):
    """``mains`` while plugged in or above ``low_level``; ``saving`` on battery below it."""

    mains: Policy
    saving: Policy
    low_level: float = 0.3

    def select(self, state: State) -> Policy:
        """The policy that decides in ``state``."""
        return self.saving if state.on_battery and state.battery_level < self.low_level else self.mains

    def choose(self, options, state):
        return self.select(state).choose(options, state)


def active_policy(policy: Policy, state: State) -> Policy:
    """The rule that decides in ``state``: through :class:`Hysteresis` to its inner policy,
    through :class:`BatteryAware` to the one the battery selects."""
    while True:
        if isinstance(policy, Hysteresis):
            policy = policy.inner
        elif isinstance(policy, BatteryAware):
            policy = policy.select(state)
        else:
            return policy


@dataclass
class Hysteresis(Policy):
    """Switch away from the current option only when another is better by ``margin`` (a share
    of the current one's latency, or energy for an energy policy) ``hold`` times in a row, or
    when one option stays better by less for longer: its advantages (shares, as the margin)
    over consecutive decisions that all want it add up to ``accrue`` (default ``margin *
    hold``: 5 % four times, 2.5 % eight times). An advantage below ``least`` (default
    ``margin / 4``) adds nothing and starts the sum afresh: it is within what the estimates
    themselves wobble by. ``accrue=0`` turns the sum off. An advantage of ``accrue`` or
    more (20 % by default; an option whose current one is predicted to take forever) is the
    whole sum on its own, so it switches at once, without the ``hold``: estimates that
    large are not the estimator's wobble (it confirms a far-off probe with a second one
    before it moves), and in four benchmark runs of ten 45 s windows the controller made 0-5
    decisions a window (trials aside), never two within 2.5 s. A prediction that is not a number adds nothing
    and starts the sum afresh.

    Why the sum: with the margin alone a plan 8 % better for a whole 35 s stretch of a
    trace never won (a benchmark window on a 3G trace), while a wobble of the estimate
    around a switch point must still not flap (each wobble back to the current option
    starts the sum afresh)."""

    inner: Policy
    margin: float = 0.1
    hold: int = 2
    objective: str = "latency_s"
    current: Option | None = None
    accrue: float | None = None
    least: float | None = None
    _streak: int = 0
    _accrued: float = 0.0
    _wanted: tuple | None = None  # the key of the option the sum is for

    def __post_init__(self) -> None:
        if not 0 <= self.margin < 1 or self.hold < 1:
            raise ValueError(f"need 0 <= margin < 1 and hold >= 1, not {self.margin}, {self.hold}")
        if self.accrue is None:
            self.accrue = self.margin * self.hold
        if self.least is None:
            self.least = self.margin / 4

    def choose(self, options, state):
        wanted = self.inner.choose(options, state)
        if self.current is None:
            self.current = wanted
            return wanted
        now = next((o for o in options if o.key == self.current.key), None)
        if now is None or wanted.key == now.key:
            self._streak, self._accrued, self._wanted = 0, 0.0, None
            self.current = now or wanted
            return self.current
        ours, theirs = getattr(now, self.objective), getattr(wanted, self.objective)
        advantage = 1 - theirs / ours if ours > 0 else 0.0
        if math.isnan(advantage):  # both unbounded, or a prediction that is not a number
            advantage = 0.0
        better = theirs < (1 - self.margin) * ours
        different_rule = wanted.accuracy != now.accuracy or (now.latency_s > getattr(self.inner, "slo_s", math.inf))
        self._streak = self._streak + 1 if (better or different_rule) else 0
        if wanted.key != self._wanted or advantage < self.least:
            self._accrued = 0.0
        self._wanted = wanted.key
        if advantage >= self.least:
            self._accrued += advantage
        if self._streak >= self.hold or (self.accrue > 0 and self._accrued >= self.accrue - 1e-12):
            self._streak, self._accrued, self._wanted = 0, 0.0, None
            self.current = wanted
        else:
            self.current = now
        return self.current

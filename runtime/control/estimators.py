"""Estimators of the link from real transfers: bandwidth and round-trip time.

Every offload is a measurement: ``bytes`` went up (and an answer came back) in a round trip
of ``seconds``, of which ``edge_seconds`` was the node's compute. :class:`LinkEstimator`
turns them into a bandwidth and an RTT estimate:

- the **RTT** is a low percentile of the overhead of small requests (those whose bytes take
  less than a tenth of the round trip at the current estimate), or of all requests minus
  their transfer time, so queueing on a busy link does not inflate it;
- the **bandwidth** is the harmonic mean of the last ``window`` per-request rates
  (``bytes / (round trip - edge - RTT)``) seen within ``max_age_s``: one very fast sample
  (a request that fit in a token bucket, or in the socket buffer) cannot pull it up, and
  rates from long ago (sparse probes while everything runs on the device) do not hold it
  where the link was (a harmonic mean clings to its low rates: over 10 s of probes a
  second or two apart, a link climbing from 1.3 to 3.5 Mbit/s in steps under 2x was read
  at 1.3-1.9 for 8 s in a benchmark run; 4 s, the default, holds two or three such probes,
  and probes further apart than that are each the estimate alone, as accurate as one probe
  timed at the node is, a few percent, while one far above it still waits for a second);
- a **sharp drop** (``drop_samples`` consecutive rates below ``drop_ratio`` of the
  estimate, or one below it when the last sample is older than ``drop_after_s``) restarts
  the window from those samples, so the estimate follows a cut in bandwidth within a few
  requests instead of a full window;
- a **sharp rise** (as many consecutive rates above ``1 / drop_ratio`` times the estimate,
  or two when they come sparsely, as probes do) restarts it too: the harmonic mean would
  otherwise cling to the low rates of a link that has come back.

Example::

    >>> est = LinkEstimator(window=8)
    >>> for _ in range(8):
    ...     _ = est.observe(sent_bytes=125_000, seconds=0.12, edge_seconds=0.0, at=0.0)
    >>> round(est.bandwidth_mbit, 1), round(1000 * est.rtt_s)
    (10.0, 20)
    >>> for t in (1.0, 1.1, 1.2):   # the link drops to 1 Mbit/s
    ...     _ = est.observe(sent_bytes=125_000, seconds=1.02, edge_seconds=0.0, at=t)
    >>> round(est.bandwidth_mbit, 1), est.drops
    (1.0, 1)
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

MIN_TRANSFER_S = 1e-4  # below this a request says nothing about the bandwidth


# In plain float arithmetic: the statistics module's harmonic mean adds in exact fractions and
# its quantiles computes all nine deciles for the one wanted, which made them most of the
# controller's per-answer work (a weak device pays it on every answer). They agree with it to
# rounding (a few units in the last place).
def harmonic_mean(values: Sequence[float]) -> float:
    """The harmonic mean of positive ``values`` (0.0 if any is 0)."""
    if any(v <= 0 for v in values):
        if any(v < 0 for v in values):
            raise ValueError("harmonic mean of negative values")
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def first_decile(values: Iterable[float]) -> float:
    """The 10th percentile of at least two ``values``, interpolated within them (as
    ``statistics.quantiles(values, n=10, method="inclusive")[0]``, to rounding)."""
    data = sorted(values)
    m = len(data) - 1
    j, delta = divmod(m, 10)
    if delta == 0:
        return data[j]
    return (data[j] * (10 - delta) + data[j + 1] * delta) / 10


@dataclass(frozen=True)
class LinkEstimate:
    bandwidth_mbit: float
    rtt_s: float
    samples: int
    drops: int


class LinkEstimator:
    """Bandwidth and RTT from observed offloads, robust to outliers, quick to see a drop."""

    def __init__(self, window: int = 16, initial_mbit: float = 10.0, initial_rtt_s: float = 0.02,
                 drop_ratio: float = 0.5, drop_samples: int = 3, drop_after_s: float = 0.5,
                 max_age_s: float = 4.0) -> None:
        if window < drop_samples or drop_samples < 1:
            raise ValueError(f"need 1 <= drop_samples ({drop_samples}) <= window ({window})")
        if not max_age_s > 0:
            raise ValueError(f"need max_age_s > 0, not {max_age_s}")
        if not 0 < drop_ratio < 1 or not initial_mbit > 0:
            raise ValueError(f"need 0 < drop_ratio < 1 and initial_mbit > 0, not {drop_ratio}, {initial_mbit}")
        self.window = window
        self.drop_ratio = drop_ratio
        self.drop_samples = drop_samples
        self.drop_after_s = drop_after_s
        self.max_age_s = max_age_s
        self._rates: deque[tuple[float, float]] = deque(maxlen=window)  # (when, bits per second), one per request
        self._overheads: deque[float] = deque(maxlen=window)  # seconds of a round trip not spent sending
        self._low: list[float] = []  # consecutive rates below the drop ratio
        self._high: list[float] = []  # consecutive rates above 1 / the drop ratio
        self._last_at: float | None = None
        self.bandwidth_mbit = initial_mbit
        self.rtt_s = initial_rtt_s
        self.samples = 0
        self.drops = 0
        self.rises = 0

    def observe(self, sent_bytes: int, seconds: float, edge_seconds: float = 0.0, at: float = 0.0,
                answer_bytes: int = 0) -> LinkEstimate:
        """One offload: ``sent_bytes`` up, ``answer_bytes`` back, ``seconds`` round trip, ``at`` its end."""
        bits = 8 * (sent_bytes + answer_bytes)
        carried = seconds - edge_seconds
        if carried <= 0 or bits <= 0:
            return self.estimate
        expected_transfer = bits / (self.bandwidth_mbit * 1e6)
        if self._rates:  # the first request is timed against the initial RTT, not the guessed bandwidth
            self._overheads.append(max(0.0, carried - expected_transfer))
            if expected_transfer < 0.1 * carried or len(self._overheads) >= 3:
                self.rtt_s = self._low_overhead()
        self.rtt_s = min(self.rtt_s, carried)  # no round trip is shorter than the RTT
        transfer = carried - self.rtt_s
        if transfer >= MIN_TRANSFER_S:
            self._add_rate(bits / transfer, at)
        elif bits / carried > self.bandwidth_mbit * 1e6:
            # Too fast to time the bytes apart from the round trip: the link is at least
            # this fast, which is all this request can tell.
            self._add_rate(bits / carried, at)
        return self._seen(at)

    def observe_timeout(self, sent_bytes: int, seconds: float, at: float = 0.0) -> LinkEstimate:
        """An offload of ``sent_bytes`` that missed its deadline after ``seconds``: the link
        carried them in no less, so its rate is at most this. Counted as a sample only when
        that bound is below the estimate (it can then start a drop); a bound above it says
        nothing. A deadline missed for another reason (a queue at the edge, a retry that ran
        out of time) reads as a slow link too: running locally is then right anyway, and the
        probes, free of the edge's time, bring the estimate back within two of them."""
        bound = 8 * sent_bytes / max(seconds - self.rtt_s, MIN_TRANSFER_S)
        if not (sent_bytes > 0 and bound < self.bandwidth_mbit * 1e6):
            return self.estimate
        self._add_rate(bound, at)
        return self._seen(at)

    def observe_train(self, lead_bytes: int, lead_s: float, gap_bytes: int, gap_s: float, total_s: float,
                      at: float = 0.0) -> LinkEstimate:
        """Two requests sent back to back, without waiting between them (a probe).

        The second's ``gap_bytes`` went onto the link right behind the first's, so it arrived
        ``gap_s`` after it (best timed by the node, from the arrivals it saw): its time on the
        link, whatever the fixed costs (RTT, serving, the answers) and whenever the device got
        round to reading the answers (a device busy with its own work reads them late: timed
        there, from the answers, a probe beside a head's compute read 0.45-0.88 of a 1.5-6
        Mbit/s link). ``lead_s``, the first's round trip with the node's compute taken out, gives an
        RTT sample; ``total_s``, the second's, bounds the rate from below when the gap is too
        short to time. (Sent one after the other instead, ``gap_bytes`` is how many more the
        second carried and ``gap_s`` how much longer it took.)
        """
        bits = 8 * gap_bytes
        if bits <= 0:
            return self.estimate
        if gap_s < MIN_TRANSFER_S:
            # Too close to tell apart (a buffer took both, or jitter): the link is at least as
            # fast as the pair's whole round trip shows, and that is all. (Not bits / 0.1 ms:
            # under jitter that would read as gigabits.)
            floor = 8 * (lead_bytes + gap_bytes) / total_s if total_s > 0 else 0.0
            if floor <= self.bandwidth_mbit * 1e6:
                return self.estimate
            self._add_rate(floor, at)
            return self._seen(at)
        rate = bits / gap_s
        self._overheads.append(max(0.0, lead_s - 8 * lead_bytes / rate))
        self.rtt_s = self._low_overhead()
        self._add_rate(rate, at)
        return self._seen(at)

    def _seen(self, at: float) -> LinkEstimate:
        """Count one measurement taken at ``at`` (the drop rule's clock)."""
        self._last_at = at
        self.samples += 1
        return self.estimate

    def _low_overhead(self) -> float:
        """The RTT: the 10th percentile of the overheads seen (their minimum while there are few)."""
        if len(self._overheads) < 3:
            return min(self._overheads)
        # inclusive: within the samples (the default extrapolates below the least, to negative RTTs)
        return first_decile(self._overheads)

    def _add_rate(self, rate: float, at: float) -> None:
        while self._rates and at - self._rates[0][0] > self.max_age_s:  # not where the link is now
            self._rates.popleft()
        current = self.bandwidth_mbit * 1e6
        if not self._rates and rate <= current / self.drop_ratio:
            # The first measurement replaces the initial guess, unless it is far above it: one
            # fast sample (a probe through a buffer) must not send everything to the edge.
            if rate < self.drop_ratio * current:
                self.drops += 1
            self._restart([rate], at)
            return
        stale = self._last_at is not None and at - self._last_at > self.drop_after_s
        if rate < self.drop_ratio * current:
            self._high.clear()
            self._low.append(rate)
            if len(self._low) >= self.drop_samples or stale:
                self._restart(self._low, at)
                self.drops += 1
                return
        elif rate > current / self.drop_ratio:
            # A harmonic mean clings to the low rates in its window: a link that came back
            # would take a whole window of samples (sparse probes: many seconds) to show.
            # Consecutive rates this far above it restart the window, more warily than a
            # drop: two when they come sparsely, as probes do.
            self._low.clear()
            self._high.append(rate)
            if len(self._high) >= self.drop_samples or (stale and len(self._high) >= 2):
                self._restart(self._high, at)
                self.rises += 1
                return
            if not self._rates:
                return  # alone it would be the whole window: wait for a second
        else:
            self._low.clear()
            self._high.clear()
        self._rates.append((at, rate))
        self._update()

    def _restart(self, rates: list[float], at: float) -> None:
        self._rates.clear()
        self._rates.extend((at, r) for r in rates)
        rates.clear()
        self._update()

    def _update(self) -> None:
        self.bandwidth_mbit = harmonic_mean([r for _, r in self._rates]) / 1e6

    @property
    def unconfirmed(self) -> bool:
        """Whether the last rates were far from the estimate without yet being enough to move it."""
        return bool(self._low or self._high)

    @property
    def estimate(self) -> LinkEstimate:
        return LinkEstimate(self.bandwidth_mbit, self.rtt_s, self.samples, self.drops)


class DeviceTimeEstimator:
    """How the device's own work compares with its profile, learned from every answer.

    A profile taken at start-up can be off for the whole run: under a CFS quota a head's
    time depends on how its work falls across the scheduler's periods, other processes
    share the CPU, a clock governor steps. The device sees the time of every request it
    runs, so each answer gives one ratio of observed to predicted device time for the cut
    it ran. :meth:`scale` is the median of the last ``window`` ratios at that cut, or, for a
    cut with fewer than ``min_samples`` ratios or no recent one (see ``stale_after``
    below), :meth:`unseen_scale`: the median over the last ``window`` answers at any cut
    where it says the device is slower than profiled (a device that runs 30 % slow at one cut
    most likely does at the next; and a slowdown that moved the plan away from a cut must
    not keep it away once the device is back to speed); where it says faster, see below.
    Given the unseen cut's predicted time, a slowdown is carried as the smaller of
    that ratio and the time it added (the median of the recent answers' observed minus
    predicted seconds) spread over the longer run: under a quota a short head waits out part
    of a scheduler period, which a longer run pays about once, not in proportion (in a
    benchmark run heads of 38-59 ms ran 1.65x their profile while the whole model ran
    1.2x, and carried as 1.65x the whole model was predicted at 185 ms against 137: the
    controller kept offloading over a 1.3 Mbit/s link for 12 s). Either way a slowdown is
    carried as at least 1; a cut predicted too fast is soon run and learned, while one
    predicted too slow may never be run again. A speed-up is carried only from answers whose
    runs were at least as long as the unseen cut's (their median ratio, where the last
    ``window`` answers hold ``min_samples`` such): under a CPU quota a short head's time is
    mostly how its work fell across the scheduler's periods (a MobileNetV2 head profiled at
    233 ms ran in one 100 ms period, 0.4 of it, in a benchmark run), which says nothing
    about a longer run, and carried over it sent a controller all on the device at 1.1
    Mbit/s on a predicted 266 ms that took 650-790. A longer run spans more periods and
    averages that out, so its speed-up says the device is faster than when it was profiled,
    for shorter runs too (in a benchmark run profiled during a slow spell of the host, all
    on the device ran at 0.84 of its profile, cut 8's head at 0.79-0.96 of its own once
    tried; predicted at its full profile in between, cut 8 lost every comparison and the
    controller kept off it where the oracle took it in 40 rounds of 66). Exploring a cut
    measures it. Ratios are clamped to ``[low, high]`` so one
    stalled request cannot swing a plan (a cut seen again after going stale starts its
    window afresh), and answers predicted to take less than ``min_predicted_s`` are
    skipped: there the fixed cost of any request (the interpreter, an exit's softmax) is
    most of what is observed, and its ratio says nothing about how fast the device computes.

    How long a cut's own ratio holds once the plan has left it: ``stale_after`` answers at
    first, doubled (up to ``max_stale_after``) each time the cut, run again after going
    stale, measures within ``confirm_tolerance`` of the ratio it had, and back to
    ``stale_after`` when it does not. A ratio learned during a slow spell of the host, or
    from a two-answer trial that ran slow, keeps the plan away from that cut only for a
    short while (in a benchmark run a cut learned at 1.2x during a 6 s slow spell, held for
    32 answers, kept the controller on the device for 17 s after the host was back to
    speed); a ratio that keeps being confirmed is not re-checked ever more often.

    Example::

        >>> est = DeviceTimeEstimator(window=4)
        >>> for s in (0.50, 0.48, 0.52):
        ...     est.observe(cut=20, observed_s=s, predicted_s=0.37)
        >>> round(est.scale(20), 2), round(est.scale(8), 2)   # cut 8 not seen: the overall ratio (at least 1)
        (1.35, 1.35)
        >>> round(est.unseen_scale(predicted_s=0.74), 2)   # a run twice as long: the 0.13 s added, spread
        1.18
    """

    def __init__(self, window: int = 8, min_samples: int = 2, low: float = 0.25, high: float = 8.0,
                 stale_after: int | None = None, min_predicted_s: float = 0.0005,
                 max_stale_after: int | None = None, confirm_tolerance: float = 0.15) -> None:
        if window < 1 or min_samples < 1 or not 0 < low <= 1 <= high:
            raise ValueError(f"need window >= 1, min_samples >= 1 and 0 < low <= 1 <= high, "
                             f"not {window}, {min_samples}, {low}, {high}")
        self.window = window
        self.min_samples = min_samples
        self.low, self.high = low, high
        self.stale_after = window + window // 2 if stale_after is None else stale_after
        self.max_stale_after = max(4 * window, self.stale_after) if max_stale_after is None else max_stale_after
        if not 1 <= self.stale_after <= self.max_stale_after or not confirm_tolerance >= 0:
            raise ValueError(f"need 1 <= stale_after <= max_stale_after and confirm_tolerance >= 0, not "
                             f"{self.stale_after}, {self.max_stale_after}, {confirm_tolerance}")
        self.confirm_tolerance = confirm_tolerance
        self.min_predicted_s = min_predicted_s
        self._by_cut: dict[int, deque[float]] = {}
        self._last_at: dict[int, int] = {}  # cut -> the sample count when it was last observed
        self._stale_for: dict[int, int] = {}  # cut -> answers its ratio holds once left (default stale_after)
        self._before: dict[int, float] = {}  # cut -> its ratio when it went stale, until run again enough
        self._recent: deque[float] = deque(maxlen=window)
        self._recent_excess: deque[float] = deque(maxlen=window)  # observed - predicted seconds (clamped as the ratio)
        self._recent_predicted: deque[float] = deque(maxlen=window)  # the predicted seconds of each
        self.samples = 0

    def observe(self, cut: int, observed_s: float, predicted_s: float) -> None:
        """One request at ``cut`` took ``observed_s`` of device time where ``predicted_s`` was expected."""
        if not (predicted_s >= self.min_predicted_s and predicted_s > 0 and observed_s > 0):
            return
        ratio = min(self.high, max(self.low, observed_s / predicted_s))
        if cut in self._last_at and self.samples - self._last_at[cut] >= self.stale_for(cut):
            seen = self._by_cut[cut]
            if len(seen) >= self.min_samples:
                self._before[cut] = statistics.median(seen)
            seen.clear()  # stale: what it measured then says nothing about now
        seen = self._by_cut.setdefault(cut, deque(maxlen=self.window))
        seen.append(ratio)
        if cut in self._before and len(seen) >= self.min_samples:
            before, now = self._before.pop(cut), statistics.median(seen)
            confirmed = abs(now / before - 1.0) <= self.confirm_tolerance
            self._stale_for[cut] = min(self.max_stale_after, 2 * self.stale_for(cut)) if confirmed else self.stale_after
        self._recent.append(ratio)
        self._recent_excess.append((ratio - 1.0) * predicted_s)
        self._recent_predicted.append(predicted_s)
        self.samples += 1
        self._last_at[cut] = self.samples

    def overall(self) -> float:
        """The median ratio over the last ``window`` answers (1.0 before any)."""
        return statistics.median(self._recent) if self._recent else 1.0

    def scale(self, cut: int, predicted_s: float | None = None) -> float:
        """What to multiply the profile's device time at ``cut`` (``predicted_s``, where known) by."""
        return statistics.median(self._by_cut[cut]) if self._learned(cut) else self.unseen_scale(predicted_s)

    def unseen_scale(self, predicted_s: float | None = None) -> float:
        """The scale of a cut without enough ratios of its own: the overall ratio, at least 1;
        for a cut predicted to take ``predicted_s``, a slowdown at most 1 plus the recent
        answers' median added time over ``predicted_s``, or a speed-up seen on runs at least
        that long (see the class docstring)."""
        if predicted_s is None:
            return max(1.0, self.overall())
        return self.carried_scales({0: predicted_s})[0]

    def carried_scales(self, predicted_s: Mapping[int, float]) -> dict[int, float]:
        """:meth:`unseen_scale` for each cut of ``predicted_s`` (cut -> its predicted seconds),
        the medians taken once."""
        ratio = self.overall()
        if ratio > 1.0:
            added = statistics.median(self._recent_excess)
            return {cut: max(1.0, min(ratio, 1.0 + added / s)) if s > 0 else ratio for cut, s in predicted_s.items()}
        if ratio == 1.0:
            return dict.fromkeys(predicted_s, 1.0)
        return {cut: self._carried_speed_up(s) for cut, s in predicted_s.items()}

    def _carried_speed_up(self, predicted_s: float) -> float:
        """The median ratio of the recent answers that ran at least ``predicted_s`` (1 if
        fewer than ``min_samples`` did; never above 1)."""
        longer = [r for r, p in zip(self._recent, self._recent_predicted) if p >= predicted_s]
        return min(1.0, statistics.median(longer)) if len(longer) >= self.min_samples else 1.0

    def scales(self) -> dict[int, float]:
        """The learned ratio of every cut with enough recent answers of its own."""
        return {cut: statistics.median(r) for cut, r in self._by_cut.items() if self._learned(cut)}

    def _learned(self, cut: int) -> bool:
        """Whether ``cut`` has enough answers of its own, the last one recent."""
        seen = self._by_cut.get(cut)
        return (seen is not None and len(seen) >= self.min_samples
                and self.samples - self._last_at[cut] < self.stale_for(cut))

    def stale_for(self, cut: int) -> int:
        """How many answers at other cuts ``cut``'s own ratio holds for now (see the class docstring)."""
        return self._stale_for.get(cut, self.stale_after)

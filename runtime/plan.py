"""The plan in force on a device: cut, exit thresholds, transfer codec, and its epoch.

A :class:`Plan` is immutable. The device runner reads its plan once per request, so a new
plan (from the controller, or set by hand) is swapped in atomically between requests:
every request runs entirely under one plan, and its answer says which (``epoch``).

Example::

    >>> plan = Plan(cut=4, thresholds={4: 0.9, 7: 0.95}, codec="int8", epoch=1)
    >>> plan.threshold(4), plan.threshold(2)
    (0.9, 1.01)
    >>> plan.with_changes(cut=7).epoch
    2
    >>> sorted(plan.active_exits(cut=7))
    [4, 7]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from edgesplit.runtime import codec as codecs

NEVER = 1.01  # a threshold above any max-softmax confidence: the exit is never taken


@dataclass(frozen=True)
class Plan:
    """Where to cut, when to exit early, how to encode what crosses, and the plan's epoch."""

    cut: int
    thresholds: Mapping[int, float] = field(default_factory=dict)
    codec: str = "fp32"
    compression: str = "none"
    epoch: int = 0
    # How long this plan's offloads may take before the request completes on the device
    # instead (seconds); None: the runner's own deadline. The runner uses the shorter.
    offload_deadline_s: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.cut, bool) or not isinstance(self.cut, int) or self.cut < 0:
            raise ValueError(f"cut must be a non-negative integer, not {self.cut!r}")
        if self.codec not in codecs.CODECS:
            raise ValueError(f"codec must be one of {codecs.CODECS}, not {self.codec!r}")
        if self.compression not in codecs.COMPRESSIONS:
            raise ValueError(f"compression must be one of {codecs.COMPRESSIONS}, not {self.compression!r}")
        if self.offload_deadline_s is not None and not (
                isinstance(self.offload_deadline_s, (int, float)) and not isinstance(self.offload_deadline_s, bool)
                and 0 < self.offload_deadline_s < float("inf")):
            raise ValueError(f"offload_deadline_s must be a positive number of seconds or None, "
                             f"not {self.offload_deadline_s!r}")
        frozen = {}
        for k, v in dict(self.thresholds).items():
            value = float(v)
            if value != value or value < 0:
                raise ValueError(f"threshold of exit {k} must be a number >= 0, not {v!r}")
            frozen[int(k)] = value
        object.__setattr__(self, "thresholds", MappingProxyType(frozen))

    def threshold(self, exit_cut: int) -> float:
        """The confidence exit ``exit_cut`` needs; exits without one are never taken."""
        return self.thresholds.get(exit_cut, NEVER)

    def active_exits(self, cut: int | None = None, exits: Iterable[int] | None = None) -> tuple[int, ...]:
        """Exits before or at the cut whose threshold can be met (max-softmax is at most 1)."""
        cut = self.cut if cut is None else cut
        candidates = self.thresholds if exits is None else exits
        return tuple(sorted(e for e in candidates if e <= cut and self.threshold(e) <= 1.0))

    def with_changes(self, **changes) -> Plan:
        """A new plan with ``changes`` applied and the next epoch (unless one is given)."""
        changes.setdefault("epoch", self.epoch + 1)
        return replace(self, **changes)

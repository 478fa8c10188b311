"""What the emulated link does: :class:`LinkSettings` (rate, delay, jitter, loss, outage) and
the validation of its values."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

__all__ = ["OUTAGES", "LinkSettings", "Outage", "number"]

Outage = Literal["blackhole", "reset"]
OUTAGES: tuple[str | None, ...] = (None, "blackhole", "reset")


def number(name: str, value: Any) -> float:
    """``value`` as a float if it is a finite number >= 0; ``ValueError`` naming ``name`` if not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class LinkSettings:
    """What the emulated link does; the same settings apply to both directions.

    - ``rate_mbps``: bandwidth of each direction in Mbit/s (``None``: unlimited; ``0``:
      nothing is transmitted until the rate rises again). A message of B bytes takes
      B / rate to cross an idle link, on top of the delay.
    - ``delay_ms``: one-way delay added to every byte.
    - ``jitter_ms``: the delay varies uniformly within ``delay_ms ± jitter_ms`` (never below
      0 and never reordering bytes).
    - ``loss``: probability that a TCP segment (1448 bytes) is lost, emulated as a stall.
    - ``stall_ms``: how long a loss holds the stream (a retransmission timeout).
    - ``outage``: ``None`` (link up), ``"blackhole"`` (bytes are accepted and held, nothing
      is forwarded until the link is back) or ``"reset"`` (connections are reset, new ones
      refused).

    >>> LinkSettings(rate_mbps=2, delay_ms=25).replace(outage="blackhole").outage
    'blackhole'
    """

    rate_mbps: float | None = None
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    stall_ms: float = 200.0
    outage: Outage | None = None

    def __post_init__(self) -> None:
        if self.rate_mbps is not None:
            object.__setattr__(self, "rate_mbps", number("rate_mbps", self.rate_mbps))
        for name in ("delay_ms", "jitter_ms", "loss", "stall_ms"):
            object.__setattr__(self, name, number(name, getattr(self, name)))
        if self.loss > 1:
            raise ValueError(f"loss is a probability between 0 and 1, got {self.loss!r}")
        if self.outage not in OUTAGES:
            raise ValueError(f"outage must be null, 'blackhole' or 'reset', got {self.outage!r}")

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """Names of the settable fields."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **fields: Any) -> LinkSettings:
        """A copy with ``fields`` changed; unknown names or bad values raise ``ValueError``."""
        unknown = sorted(set(fields) - set(self.fields()))
        if unknown:
            raise ValueError(
                f"unknown link setting(s) {', '.join(unknown)}; "
                f"settable: {', '.join(self.fields())}"
            )
        return dataclasses.replace(self, **fields)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: LinkSettings | None = None) -> LinkSettings:
        """Settings from a dict; fields it leaves out come from ``base`` (or the defaults)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"link settings must be a JSON object, got {data!r}")
        return (base or cls()).replace(**dict(data))

    @property
    def blocked(self) -> bool:
        """True when nothing is transmitted (an outage or a rate of 0)."""
        return self.outage is not None or self.rate_mbps == 0

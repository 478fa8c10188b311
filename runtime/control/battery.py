"""Battery level and power source: the machine's own (psutil) or a simulated one.

Most development machines and edge boards have no battery to read, so
:class:`SimulatedBattery` stands in: a capacity in joules, drained by the energy the cost
model charges each request (compute time x compute power + transfer time x radio power),
recharged while plugged in, with a schedule of plug-in / unplug times.

Example::

    >>> battery = SimulatedBattery(capacity_j=100.0, level=0.5, schedule=[(10.0, True)])
    >>> battery.drain(20.0, at=1.0)
    >>> battery.reading(at=1.0)
    BatteryReading(level=0.3, on_battery=True)
    >>> battery.reading(at=11.0).on_battery
    False
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class BatteryReading:
    level: float  # 0..1
    on_battery: bool


class SimulatedBattery:
    """A battery of ``capacity_j`` joules at ``level``, plugged in or not on a ``schedule``."""

    def __init__(self, capacity_j: float, level: float = 1.0, plugged: bool = False,
                 schedule: Sequence[tuple[float, bool]] = (), charge_w: float = 10.0) -> None:
        # Comparisons written so that NaN fails them
        if not (0 < capacity_j < math.inf and 0.0 <= level <= 1.0 and 0 <= charge_w < math.inf):
            raise ValueError(f"need 0 < capacity_j < inf, 0 <= level <= 1 and 0 <= charge_w < inf, not "
                             f"{capacity_j}, {level}, {charge_w}")
        events = []
        for event in schedule:  # (seconds, plugged in): checked here, not at the first reading
            if not (isinstance(event, (tuple, list)) and len(event) == 2 and type(event[1]) is bool
                    and type(event[0]) in (int, float) and math.isfinite(event[0])):
                raise ValueError(f"a schedule event is (seconds, plugged in: True or False), not {event!r:.60}")
            events.append((float(event[0]), event[1]))
        self.capacity_j = capacity_j
        self.energy_j = level * capacity_j
        self.plugged = plugged
        self.schedule = sorted(events)
        self.charge_w = charge_w
        self._last_at: float | None = None
        self._lock = threading.Lock()

    def _advance(self, at: float) -> None:
        """Apply the plug events up to ``at``, charging only while plugged in."""
        t = at if self._last_at is None else self._last_at
        while True:
            event = self.schedule[0] if self.schedule and self.schedule[0][0] <= at else None
            until = max(t, event[0]) if event else max(t, at)
            if self.plugged and self._last_at is not None:
                self.energy_j = min(self.capacity_j, self.energy_j + self.charge_w * (until - t))
            t = until
            if event is None:
                break
            self.schedule.pop(0)
            self.plugged = event[1]
        self._last_at = t

    def drain(self, joules: float, at: float) -> None:
        """Spend ``joules`` (a request's device energy) at time ``at``."""
        with self._lock:
            self._advance(at)
            if not self.plugged:
                self.energy_j = max(0.0, self.energy_j - joules)

    def reading(self, at: float) -> BatteryReading:
        with self._lock:
            self._advance(at)
            return BatteryReading(round(self.energy_j / self.capacity_j, 6), not self.plugged)


def system_battery() -> BatteryReading | None:
    """This machine's battery through psutil, or None where there is none (or no psutil)."""
    try:
        import psutil
    except ImportError:
        return None
    battery = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
    if battery is None:
        return None
    return BatteryReading(battery.percent / 100.0, not battery.power_plugged)

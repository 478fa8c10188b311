"""Settings that change over time: bandwidth traces and scripted schedules, read from files
(:func:`load_trace`, :func:`load_schedule`) and checked before the emulator replays them."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

from .settings import LinkSettings, number

__all__ = ["load_schedule", "load_trace", "validate_schedule", "validate_trace"]


MAX_LINE_CHARS = 4096  # a trace line is two numbers: a longer one is refused unread, not held whole


def _lines(f, path: Path):
    """The lines of text file ``f``, each at most ``MAX_LINE_CHARS``; ValueError naming ``path``
    for a longer line (a 200 MB line took 1 GB and came back whole in the error) or bytes that
    are not UTF-8 text."""
    lineno = 0
    while True:
        try:
            line = f.readline(MAX_LINE_CHARS + 1)
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not a text trace (byte {exc.start} of a line is not UTF-8)") from None
        if not line:
            return
        lineno += 1
        if len(line) > MAX_LINE_CHARS and not line.endswith("\n"):
            raise ValueError(f"{path}:{lineno}: a line longer than {MAX_LINE_CHARS} characters; a trace line "
                             "is '<seconds> <Mbit/s>'")
        yield line


def load_trace(path: str | Path) -> list[tuple[float, float]]:
    """Read a bandwidth trace: one ``<seconds> <Mbit/s>`` sample a line.

    Times must increase strictly and rates be >= 0 (0: the link is down). Blank lines and
    lines starting with ``#`` are skipped. Raises ``ValueError`` naming the file and line of
    the first malformed sample.

    >>> samples = load_trace("../shared/traces/hsdpa-3g/norway_bus_1.txt")  # doctest: +SKIP
    """
    path = Path(path)
    samples: list[tuple[float, float]] = []
    with path.open(encoding="utf-8-sig") as f:  # a byte-order mark (common from editors) is skipped
        for lineno, line in enumerate(_lines(f, path), 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            parts = text.split()
            where = f"{path}:{lineno}"
            shown = repr(text) if len(text) <= 80 else repr(text[:80]) + f" ... ({len(text):,} characters)"
            if len(parts) != 2:
                raise ValueError(f"{where}: expected '<seconds> <Mbit/s>' (two numbers), got {shown}")
            try:
                t, rate = float(parts[0]), float(parts[1])
            except ValueError:
                raise ValueError(f"{where}: expected '<seconds> <Mbit/s>' (two numbers), got {shown}") from None
            if not (math.isfinite(t) and math.isfinite(rate)) or t < 0 or rate < 0:
                raise ValueError(f"{where}: time and rate must be finite and >= 0, got {shown}")
            if samples and t <= samples[-1][0]:
                raise ValueError(f"{where}: times must increase, {t} follows {samples[-1][0]}")
            samples.append((t, rate))
    if not samples:
        raise ValueError(f"{path}: no samples; expected lines of '<seconds> <Mbit/s>'")
    return samples


def load_schedule(
    path: str | Path, base: LinkSettings | None = None
) -> list[tuple[float, LinkSettings]]:
    """Read a schedule from JSON: a list of ``{"t": seconds, <setting>: value, ...}``.

    Each step changes the fields it names, the others carry over from the step before (the
    first step starts from ``base``). Example file::

        [{"t": 0, "rate_mbps": 5, "delay_ms": 20},
         {"t": 10, "outage": "blackhole"},
         {"t": 15, "outage": null, "rate_mbps": 1}]
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"{path}: not a schedule: JSON nested too deeply") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: a schedule is a non-empty JSON list of steps")
    steps: list[tuple[float, LinkSettings]] = []
    current = base or LinkSettings()
    for i, step in enumerate(data):
        if not isinstance(step, dict) or "t" not in step:
            raise ValueError(f"{path}: step {i} must be an object with a time 't', got {step!r}")
        fields = dict(step)
        try:
            t = number("t", fields.pop("t"))
            current = current.replace(**fields)
        except ValueError as e:
            raise ValueError(f"{path}: step {i}: {e}") from None
        if steps and t < steps[-1][0]:
            raise ValueError(f"{path}: step {i}: times must not decrease")
        steps.append((t, current))
    return steps


def validate_schedule(steps: Iterable[tuple[float, LinkSettings]]) -> list[tuple[float, dict]]:
    """Check ``[(seconds, LinkSettings), ...]``; return it as ``[(seconds, settings dict)]``."""
    out: list[tuple[float, dict]] = []
    for t, settings in steps:
        t = number("schedule time", t)
        if not isinstance(settings, LinkSettings):
            raise ValueError(f"schedule steps are (seconds, LinkSettings), got {settings!r}")
        if out and t < out[-1][0]:
            raise ValueError("schedule times must not decrease")
        out.append((t, settings.to_dict()))
    if not out:
        raise ValueError("a schedule needs at least one step")
    return out


def validate_trace(
    samples: Iterable[tuple[float, float]],
) -> tuple[list[tuple[float, dict]], float]:
    """Check ``[(seconds, Mbit/s), ...]``; return it as steps timed from its first sample,
    ``[(seconds, {"_trace_rate": Mbit/s})]``, and its period (the last sample lasts as long
    as the one before it)."""
    samples = [(number("trace time", t), number("trace rate", r)) for t, r in samples]
    if not samples:
        raise ValueError("a trace needs at least one sample")
    for i in range(1, len(samples)):
        if samples[i][0] <= samples[i - 1][0]:
            raise ValueError("trace times must increase")
    start = samples[0][0]
    last = samples[-1][0] - samples[-2][0] if len(samples) > 1 else 1.0
    period = samples[-1][0] - start + last
    return [(t - start, {"_trace_rate": r}) for t, r in samples], period

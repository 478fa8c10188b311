"""``edgesplit bench controller``: the embedded controller against fixed plans on real bandwidth traces.

In the test bed: an ``edge-node --random-weights`` serving the model's tails in ``edge1``
pinned to core 1, the device (:mod:`edgesplit.bench.controller_device`) in ``device`` pinned
to core 0 under a CPU quota: the ``pizero2`` class (0.15 of a core, 33 ms CFS periods) by
default, where MobileNetV2 is best all on the device up to about 2 Mbit/s and at cut 8 from
about 3 Mbit/s (81 and 71 ms at 4 and 8 Mbit/s against 105-111 all on the device), inside
the traces' 0.05-8 Mbit/s; ``--device mcu`` (0.05 of a core) moves the crossovers to about 0.3
and 4 Mbit/s, but a request there waits out whole 100 ms CFS periods, so single latencies
jump in 100 ms steps against the 5-15 % that adapting can win (on the Pi-4 class all on the
device wins throughout). Every idle is jittered, and every comparison is of means over many
requests.
For each trace, a ``duration_s`` window is replayed on the device's link with tbf, once per
live run: by default (``--window gain``) the one where the per-moment best plan beats the
best fixed plan by the largest share in the measured table (:func:`window_by_gain`, chosen
from the trace and the table before any live run); ``--window widest``, the one whose
bandwidth swings most (the default before 2026-12-07; in its last mcu run those windows
left the oracle 0-13 % ahead of the best fixed plan, 4 % on average); ``--window start``, the trace's first seconds.
``--model resnet_fm`` (or ``resnet18``) splits another model (random weights: only times
matter).

- **adaptive**, **best static** and the **oracle's plans**, in turns: the embedded
  controller's runner (least latency with hysteresis, probing while idle, starting all on
  the device, choosing among the plans the table makes fastest at some bandwidth in the
  traces' range, :func:`envelope_plans`; until 2026-12-07 20:00 UTC among all the table's
  candidates: cut 0, every cut sending fewer bytes than all before it, all on the device),
  a runner of the best fixed
  plan by the table and one of the plan the table makes best at the most other moments of
  the window, or else puts near the best at the most (:func:`turn_plans`) take turns
  request by request, so within a round they all see the same link and the same host;
- **all_device** and **all_edge** (the image, int8): fixed plans, in their own runs unless
  they were among the plans in turns.

First every candidate fixed plan is timed at a grid of bandwidths and its latency fitted as
``fixed + k / bandwidth`` (:func:`fit_table`); the **best static** plan is the one whose fit
is least over the window's bandwidth, and it chooses the plans in turns. Then each plan in
turns is fitted the same way to its own live requests: the **oracle** takes, at each round,
the plan whose live fit is least at that moment's bandwidth, at the latency that plan's
request of the round measured, and the **best static** plan is the one whose live fit is
least over the rounds (:func:`live_rounds`). Until 2026-12-07 the oracle was the table
scaled to the level of the live best static run, which is kept as ``oracle_scaled_ms``
(and ``gain_captured_scaled``): plans drift away from their table by different shares. Each
trace's ``paired_delta_ms`` (summed in the summary) says where the adaptive runner gained
or lost against the runner of the table's best static plan (``best_static_plan_table``,
which the live fits may not confirm as best) (:func:`paired_deltas`). The oracle chooses
only among the plans in turns (two): where the table's oracle would take a third plan, the
live one cannot, which can only make it slower.

Run as root: ``edgesplit bench controller --json bench/results/controller.json`` (``--quick``:
two traces of 10 s, about 2 minutes; ``--traces DIR``: any folder of ``<seconds> <Mbit/s>`` traces).
"""

from __future__ import annotations

import bisect
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import machine_info, table
from .split import TBF_LATENCY_S, DeviceProcess, tbf_burst

DEFAULT_TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "traces"
FULL = {"model": "mobilenet_v2", "device": "pizero2", "traces": 10, "duration_s": 45.0,
        "grid": (0.25, 0.5, 1.0, 2.0, 4.0, 8.0), "repeats": 5, "profile_repeats": 6, "slo_ms": 2000.0,
        "window": "gain"}
QUICK = {"model": "mobilenet_v2", "device": "pizero2", "traces": 2, "duration_s": 10.0,
         "grid": (0.5, 4.0), "repeats": 2, "profile_repeats": 3, "slo_ms": 2000.0,
         "window": "gain"}
EDGE_PORT = 8001
MIN_RATE_MBIT = 0.05  # a trace's zero (link down for that moment) is shaped to this
GAIN_FLOOR = 0.05  # gain_captured counts traces where the oracle beats the best static by this share
# Fixed plans taking turns with the adaptive runner: each adds a request to every round, and
# the controller, which decides and trials by answers, reacts that much later in seconds.
MAX_TURN_PLANS = 2
EXIT_RATE_OF = 10  # answers the plotted exit rate is taken over
NEAR_BEST = 0.15  # a plan the table puts this close to the best at some moment takes turns too


WINDOWS = ("gain", "widest", "start")  # which stretch of each trace is replayed (window_by_gain, window_start)
MODELS = ("mobilenet_v2", "resnet18", "resnet_fm")  # the zoo's models the test bed can split
MIN_WINDOW_S = 5.0  # shorter, a window holds too few requests to compare plans (and 0.05 s held none)
MAX_WINDOW_S = 24 * 3600.0


def trace_files(folder: str | Path) -> list[Path]:
    """The trace files under ``folder`` (``.txt``, ``.log`` or no suffix; hidden files such
    as ``.gitkeep`` are not traces)."""
    from . import BenchmarkArgumentError

    folder = Path(folder)
    if not folder.is_dir():
        raise BenchmarkArgumentError(f"--traces {folder} is not a folder of '<seconds> <Mbit/s>' trace files")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".txt", ".log", "")
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise BenchmarkArgumentError(f"no traces in {folder}: expected files of '<seconds> <Mbit/s>' lines")
    return files


def check_options(quick: bool = False, traces: str | None = None, device: str | None = None,
                  window_s: float | None = None, count: int | None = None, model: str | None = None,
                  window: str | None = None) -> list[Path]:
    """Check the options and read every trace the run would replay, before any test bed is
    built: a malformed trace or window is found in a second, not after the profiles and the
    table (minutes) with the traces before it thrown away. Returns the chosen traces."""
    from edgesplit.linksim.traces import load_trace

    from . import BenchmarkArgumentError

    if window is not None and window not in WINDOWS:
        raise BenchmarkArgumentError(f"--window must be one of {', '.join(WINDOWS)}, not {window!r}")
    if model is not None and model not in MODELS:
        raise BenchmarkArgumentError(f"--model must be one of {', '.join(MODELS)}, not {model!r}")
    if window_s is not None and not MIN_WINDOW_S <= window_s <= MAX_WINDOW_S:
        raise BenchmarkArgumentError(f"--window-s must be {MIN_WINDOW_S:g} to {MAX_WINDOW_S:g} seconds, "
                                     f"not {window_s:g}")
    chosen = pick(trace_files(traces_folder(traces)), count or (QUICK if quick else FULL)["traces"])
    for path in chosen:
        try:
            load_trace(path)
        except (OSError, ValueError) as exc:
            raise BenchmarkArgumentError(f"trace {path}: {exc}") from None
    return chosen


def traces_folder(traces: str | None) -> Path:
    return Path(traces or os.environ.get("EDGESPLIT_TRACES") or DEFAULT_TRACES)


def pick(files: list[Path], n: int) -> list[Path]:
    """``n`` traces spread evenly over the sorted list (deterministic)."""
    if n >= len(files):
        return files
    return [files[round(i * (len(files) - 1) / max(1, n - 1))] for i in range(n)]


def window_start(samples: list[tuple[float, float]], duration_s: float, how: str = "widest") -> float:
    """Where to start replaying a trace: ``"start"``, 0; ``"widest"``, the sample time whose
    ``duration_s`` window spans the widest bandwidth range (largest max/min), where a plan
    that adapts can differ from a fixed one. A trace shorter than the window starts at 0."""
    if how == "start":
        return 0.0
    if how != "widest":
        raise ValueError(f"window must be 'start' or 'widest', not {how!r}")
    # One pass with a sliding window (monotonic deques of its largest and smallest rates):
    # recomputing every window was quadratic, some 6 minutes for a 100,000-sample trace.
    rates = [max(r, MIN_RATE_MBIT) for _, r in samples]
    highs: collections.deque[int] = collections.deque()
    lows: collections.deque[int] = collections.deque()
    best, best_ratio, j = 0.0, 0.0, 0
    for i, (t0, _) in enumerate(samples):
        if t0 + duration_s > samples[-1][0]:
            break
        while j < len(samples) and (j <= i or samples[j][0] < t0 + duration_s):  # the window is i..j-1
            while highs and rates[highs[-1]] <= rates[j]:
                highs.pop()
            highs.append(j)
            while lows and rates[lows[-1]] >= rates[j]:
                lows.pop()
            lows.append(j)
            j += 1
        while highs[0] < i:
            highs.popleft()
        while lows[0] < i:
            lows.popleft()
        ratio = rates[highs[0]] / rates[lows[0]]
        if ratio > best_ratio:
            best, best_ratio = t0, ratio
    return best


def window_by_gain(samples: list[tuple[float, float]], fits: dict[str, tuple[float, float]], duration_s: float,
                   step_s: float = 0.1, max_points: int = 1_000_000) -> float:
    """Where to start replaying a trace so that adapting can gain most: the start of the
    ``duration_s`` window where the per-moment best plan (the oracle, by the fitted table)
    beats the best fixed plan by the largest share. Chosen from the trace and the measured
    table only, before any live run. A trace shorter than the window starts at 0.

    The widest bandwidth range is not where adapting pays: a window from 0.05 to 0.5 Mbit/s
    swings tenfold inside one plan's range. On the shared traces and MobileNetV2 on the mcu
    class the widest windows left the oracle 0-13 % ahead of the best fixed plan (4 % on
    average), the noise of a 45 s window's mean."""
    import numpy as np

    end = samples[-1][0]
    if end <= duration_s or not fits:
        return 0.0
    step = max(step_s, end / max_points)  # a very long trace is sampled coarser, never in more points
    times = np.array([t for t, _ in samples])
    rates = np.maximum(np.array([r for _, r in samples], dtype=float), MIN_RATE_MBIT)
    grid = np.arange(0.0, end, step)
    at = rates[np.maximum(np.searchsorted(times, grid + 1e-9, side="right") - 1, 0)]  # as rate_at
    fixed = np.array([f for f, _ in fits.values()])[:, None]
    slope = np.array([k for _, k in fits.values()])[:, None]
    latency = np.maximum(0.0, fixed + slope / at[None, :])  # plans x moments, as table_at
    n = max(1, int(round(duration_s / step)))
    # windows that end inside the trace (counted, not searched: 23 * 0.1 > 2.3 in floats)
    starts = min(int(np.floor((end - duration_s) / step + 1e-9)) + 1, len(grid) - n + 1)
    if starts < 1 or len(grid) < n:
        return 0.0

    def window_means(values):
        sums = np.concatenate([np.zeros((*values.shape[:-1], 1)), np.cumsum(values, axis=-1)], axis=-1)
        return (sums[..., n:] - sums[..., :-n]) / n

    best_static = window_means(latency).min(axis=0)[:starts]
    oracle = window_means(latency.min(axis=0))[:starts]
    share = (best_static - oracle) / np.maximum(best_static, 1e-12)
    return float(grid[int(np.argmax(share >= share.max() - 1e-12))])  # the first of equal windows


def shifted(samples: list[tuple[float, float]], start_s: float) -> list[tuple[float, float]]:
    """The trace from ``start_s`` on, re-timed to start at 0."""
    return [(0.0, rate_at(samples, start_s))] + [(t - start_s, r) for t, r in samples if t > start_s]


def rate_at(samples: list[tuple[float, float]], t: float) -> float:
    rate = samples[0][1]
    for at, r in samples:
        if at > t:
            break
        rate = r
    return max(rate, MIN_RATE_MBIT)


def fit_table(samples_ms: dict[float, dict[str, list[float]]],
              local: tuple[str, ...] = ()) -> dict[str, tuple[float, float]]:
    """Each fixed plan's latency as ``fixed_ms + ms_per_inverse_mbit / bandwidth``, by least
    squares over every request timed at every grid bandwidth.

    Transfer time is linear in 1/bandwidth and the rest does not depend on it, so two
    numbers per plan describe the table; fitting them to all samples averages out the
    CFS-period jumps of single requests (means, as the adaptive latency is a mean). No plan
    gets a negative slope, and the plans in ``local`` (all on the device: they send nothing)
    none at all, their mean at every bandwidth: a slow spell of the host during the 0.25
    Mbit/s row once gave all on the device 11 ms per inverse Mbit/s, 44 ms more at 0.25
    Mbit/s than at 8 for a plan that never touches the link."""
    plans = list(next(iter(samples_ms.values())))
    return {plan: fit_line([(mbit, ms) for mbit, row in samples_ms.items() for ms in row[plan]], flat=plan in local)
            for plan in plans}


def fit_line(points: list[tuple[float, float]], flat: bool = False) -> tuple[float, float]:
    """``(fixed_ms, ms_per_inverse_mbit)`` fitted by least squares to ``(Mbit/s, ms)``
    points, the slope at least 0 (``flat``: 0, the points' mean)."""
    xs, ys = [1 / mbit for mbit, _ in points], [ms for _, ms in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
    if slope < 0 or flat:
        slope = 0.0
    return my - slope * mx, slope


def table_at(fits: dict[str, tuple[float, float]], plan: str, mbit: float) -> float:
    """A fixed plan's fitted latency at ``mbit``."""
    fixed, per_inverse_mbit = fits[plan]
    return max(0.0, fixed + per_inverse_mbit / mbit)


def envelope_plans(fits: dict[str, tuple[float, float]], low_mbit: float, high_mbit: float,
                   steps: int = 400) -> list[str]:
    """The plans the fitted table makes fastest at one of ``steps + 1`` log-spaced bandwidths
    from ``low_mbit`` to ``high_mbit``: the lower envelope of the measured plans, sampled, in
    the order of their cuts (a plan best only between two samples, or tied, may be left out)."""
    if not 0 < low_mbit <= high_mbit or steps < 1:
        raise ValueError(f"need 0 < low_mbit <= high_mbit and steps >= 1, not {low_mbit}, {high_mbit}, {steps}")
    best = {min(fits, key=lambda p: table_at(fits, p, low_mbit * (high_mbit / low_mbit) ** (i / steps)))
            for i in range(steps + 1)}
    return sorted(best, key=lambda p: (int(p.split(":")[0]), p))


def window_times(duration_s: float, step_s: float = 0.1) -> list[dict]:
    """Evenly spaced moments of a window, as records (``t``) for :func:`best_static_plan`."""
    return [{"t": i * step_s} for i in range(int(duration_s / step_s))]


def best_static_plan(samples, fits: dict[str, tuple[float, float]], records: list[dict]) -> str:
    """The fixed plan with the least fitted mean latency at the bandwidths ``records`` saw."""
    at = [rate_at(samples, r["t"]) for r in records]
    return min(fits, key=lambda p: statistics.fmean(table_at(fits, p, b) for b in at))


def turn_plans(samples, fits: dict[str, tuple[float, float]], duration_s: float, best: str,
               limit: int = MAX_TURN_PLANS, near: float = NEAR_BEST) -> list[str]:
    """The fixed plans that take turns with the adaptive runner: ``best`` (the best static
    plan by the table) first, then the plans the table makes best at more moments of the
    window, then those it puts within ``near`` (a share) of the best at more moments, at
    most ``limit`` in all (each adds a request to every round). The near ones are there
    because the table is minutes old and the host drifts: in one run cut 5 ran at 100 ms
    through a stretch where the table had it at 134 against cut 8's 106, and cut 8 ran 113.
    (Until 2026-12-07 12:30 UTC the near count alone ranked them, and in one run cut 15,
    near all on the device at many moments, took the turns of cut 8, the table's best at 38
    of the window's requests.)"""
    rates = [rate_at(samples, r["t"]) for r in window_times(duration_s)]
    best_at: collections.Counter[str] = collections.Counter()
    near_at: collections.Counter[str] = collections.Counter()
    for b in rates:
        at = {p: table_at(fits, p, b) for p in fits}
        least = min(at.values())
        best_at[min(at, key=at.get)] += 1
        near_at.update(p for p, ms in at.items() if ms <= (1 + near) * least)
    others = sorted((p for p in near_at if p != best), key=lambda p: (-best_at[p], -near_at[p]))
    return [best, *others][:limit]


def live_rounds(samples, adaptive: list[dict], runs: dict[str, list[dict]], local: tuple[str, ...] = ()) -> dict:
    """The oracle, the best static plan and the adaptive runner over the same rounds of
    requests taken in turns (``runs``: each fixed plan's records, one per round).

    Each plan in turns gets its own live fit (:func:`fit_line`, over its requests of the
    window against the trace's bandwidth at each; ``local`` plans flat). At each round the
    oracle's plan is the one whose live fit is least at that round's bandwidth (that of the
    adaptive request), and its latency is that plan's request of the round; the best static
    plan is the one whose live fit is least over the rounds, at its requests' own latency.
    Both are chosen in hindsight from profiles measured live beside the adaptive runner.

    Why not the table: it is measured minutes before, and the host drifts by tens of
    percent and not alike for every plan. Scaled to one live plan's level it got the others
    wrong (all on the device ran at 0.84 of its table and cut 8 at 1.01 of its own in one
    window, and the oracle's cut-8 moments were taken 13 % faster than cut 8 ran); choosing
    the plan by the table and measuring it live chose cut 8 where cut 5 ran faster."""
    n = min(len(adaptive), *(len(records) for records in runs.values()))
    fits = {p: fit_line([(rate_at(samples, r["t"]), r["ms"]) for r in records[:n]], flat=p in local)
            for p, records in runs.items()}
    at = [rate_at(samples, adaptive[i]["t"]) for i in range(n)]
    picks = [min(runs, key=lambda p: table_at(fits, p, b)) for b in at]
    best = min(runs, key=lambda p: statistics.fmean(table_at(fits, p, b) for b in at))
    return {"rounds": n, "best_static_plan": best,
            "adaptive_ms": statistics.fmean(adaptive[i]["ms"] for i in range(n)),
            "oracle_ms": statistics.fmean(runs[p][i]["ms"] for i, p in enumerate(picks)),
            "best_static_ms": statistics.fmean(runs[best][i]["ms"] for i in range(n)),
            "oracle_plans": dict(collections.Counter(picks)),
            "turns_ms": {p: statistics.fmean(r["ms"] for r in records[:n]) for p, records in runs.items()},
            "live_fit": {p: {"fixed_ms": a, "ms_per_inverse_mbit": k} for p, (a, k) in fits.items()}}


def analyse(name: str, samples, fits: dict[str, tuple[float, float]], live: dict[str, dict], slo_ms: float,
            model: str, best_static_live: str | None = None, best_static: str | None = None,
            rounds: dict[str, str] | None = None) -> dict:
    """One trace's row. With ``best_static_live`` (the label of the live run of the fixed plan
    ``best_static``, run in turns with the adaptive runner), that run sets the level: its
    live/table ratio scales the table's oracle (the table says how much switching per
    request beats the best fixed plan, the live run at what level, at the same moments as
    the adaptive run: a device under a quota drifts by tens of percent over minutes) and the
    table's best fixed plan at the adaptive requests' bandwidths. That plan is usually the
    one run (chosen beforehand over the whole window); where it is not, ``best_static_ms`` is
    the better one's table value at the run's level, never the run's own worse mean, so the
    best static is not made to look worse than it was. The table's own values stay in
    ``oracle_table_ms`` and ``best_static_table_ms``, the run's mean in ``best_static_run_ms``.

    With ``rounds`` (plan -> label of its live run, taken in turns with the adaptive runner,
    ``best_static`` among them) the oracle, the best static plan and the adaptive latency are
    taken over those rounds instead (:func:`live_rounds`), and ``best_static_plan`` is the
    live one (the table's, run in turns, is ``best_static_plan_table``); the scaled table's
    figures stay in ``oracle_scaled_ms`` and ``best_static_scaled_ms``, and the row's
    ``rounds`` says how many rounds, which plans the oracle took and each one's live fit."""
    adaptive = live["adaptive"]["records"]
    plans = list(fits)
    at_requests = [rate_at(samples, r["t"]) for r in adaptive]
    oracle = statistics.fmean(min(table_at(fits, p, b) for p in plans) for b in at_requests)
    static = {p: statistics.fmean(table_at(fits, p, b) for b in at_requests) for p in plans}
    best_at_requests = min(static, key=static.get)
    ran = best_static or best_at_requests
    best_static_ms, oracle_ms, run_ms = static[best_at_requests], oracle, None
    adaptive_ms = statistics.fmean(r["ms"] for r in adaptive)
    if best_static_live is not None:
        run_ms = statistics.fmean(r["ms"] for r in live[best_static_live]["records"])
        level = run_ms / static[ran]
        oracle_ms, best_static_ms = oracle * level, static[best_at_requests] * level
    scaled = {"oracle_scaled_ms": oracle_ms, "best_static_scaled_ms": best_static_ms}
    in_rounds = None
    if rounds:
        last = max(plans, key=lambda p: int(p.split(":")[0]))  # all on the device: sends nothing
        in_rounds = live_rounds(samples, adaptive, {p: live[label]["records"] for p, label in rounds.items()},
                                local=(last,))
        adaptive_ms, oracle_ms, best_static_ms = (in_rounds[k] for k in ("adaptive_ms", "oracle_ms", "best_static_ms"))
    table_plan, ran = ran, in_rounds["best_static_plan"] if in_rounds else ran
    return {
        "name": name, "model": model,
        "mean_mbit": statistics.fmean(at_requests),
        "adaptive_ms": adaptive_ms,
        "oracle_ms": oracle_ms, "best_static_ms": best_static_ms, "best_static_plan": ran, **scaled,
        "rounds": in_rounds, "best_static_plan_table": table_plan,
        "best_static_plan_at_requests": best_at_requests, "best_static_run_ms": run_ms,
        "oracle_table_ms": oracle, "best_static_table_ms": static[best_at_requests],
        "all_device_ms": statistics.fmean(r["ms"] for r in live["all_device"]["records"]),
        "all_edge_ms": statistics.fmean(r["ms"] for r in live["all_edge"]["records"]),
        "slo_ms": slo_ms, "slo_miss_rate": sum(r["ms"] > slo_ms for r in adaptive) / len(adaptive),
        "sent": sum(v["sent"] for v in live.values()),
        "answered": sum(len(v["records"]) for v in live.values()),
        "decisions": sum(not (d.get("explore") or d.get("ends_trial")) for d in live["adaptive"]["decisions"]),
        "explorations": sum(bool(d.get("explore")) for d in live["adaptive"]["decisions"]),
        "probes": live["adaptive"].get("probes", 0),
        "decision_log": live["adaptive"]["decisions"],
        "adaptive_records": adaptive,
        "best_static_records": live[best_static_live]["records"] if best_static_live else [],
        "fixed_ms": {label: [r["ms"] for r in live[label]["records"]] for label in live if label != "adaptive"},
        "trace": list(samples),
        "fallbacks": sum(r["error"] is not None for v in live.values() for r in v["records"]),
        # late offloads the adaptive runner raced with the device: answered by the edge / by the device
        "raced": {"edge": sum(bool(r.get("raced")) and r["where"] == "edge" for r in adaptive),
                  "device": sum(bool(r.get("raced")) and r["where"] != "edge" for r in adaptive)},
        "paired_delta_ms": None if best_static_live is None else paired_deltas(
            adaptive, live[best_static_live]["records"], max(int(p.split(":")[0]) for p in plans),
            live["adaptive"]["decisions"]),
    }


def paired_deltas(adaptive: list[dict], static: list[dict], last_cut: int, decisions: list[dict]) -> dict[str, dict]:
    """Where the adaptive runner gained or lost against the fixed plan it took turns with.

    Each adaptive request is compared with the mean of the fixed plan's requests just
    before and after it (the same link and host, a round apart), and counted by what it
    ran: ``same_plan`` (the fixed plan's own cut, offloaded, or all on the device when that
    is the fixed plan), ``trial`` (an exploration), ``fallback`` (its offload failed or was
    late and the device answered) or ``other_plan`` (the policy chose another plan, or an
    early exit answered). Plans are told apart by their cut (the benchmark sends int8 only). Each
    category: ``n``, ``mean_ms`` (positive: slower than the fixed plan) and ``total_ms``."""
    cut = static[0]["cut"] if static else None  # what the paired run ran (no records: nothing to compare)
    trials = {d["epoch"] for d in decisions if d.get("explore")}
    times = [r["t"] for r in static]
    deltas: dict[str, list[float]] = {"same_plan": [], "other_plan": [], "trial": [], "fallback": []}
    for r in adaptive:
        i = bisect.bisect_left(times, r["t"])
        near = [static[j]["ms"] for j in (i - 1, i) if 0 <= j < len(static)]
        if not near:
            continue
        if r["epoch"] in trials:
            kind = "trial"
        elif r["where"] not in ("edge", "device"):
            kind = "fallback"
        elif r["cut"] == cut and (r["where"] == "edge") == (cut < last_cut):
            kind = "same_plan"
        else:
            kind = "other_plan"
        deltas[kind].append(r["ms"] - statistics.fmean(near))
    return {k: {"n": len(v), "mean_ms": statistics.fmean(v) if v else None, "total_ms": sum(v)}
            for k, v in deltas.items()}


def gains(rows: list[dict], oracle: str = "oracle_ms", best_static: str = "best_static_ms",
          adaptive: str = "adaptive_ms") -> list[float]:
    """Each row's share of the oracle's gain over the best static plan that the adaptive
    runner captured, for rows where the oracle beats the best static plan by GAIN_FLOOR."""
    return [(r[best_static] - r[adaptive]) / (r[best_static] - r[oracle]) for r in rows
            if r[oracle] <= (1 - GAIN_FLOOR) * r[best_static]]


def summarise(rows: list[dict]) -> dict:
    captured = gains(rows)
    scaled = gains(rows, "oracle_scaled_ms", "best_static_scaled_ms") if all(
        "oracle_scaled_ms" in r for r in rows) else []
    ratio = statistics.fmean(r["adaptive_ms"] / r["oracle_ms"] for r in rows)
    lost = sum(r["sent"] - r["answered"] for r in rows)
    paired: dict[str, dict] = {}
    for r in rows:
        for kind, d in (r.get("paired_delta_ms") or {}).items():
            total = paired.setdefault(kind, {"n": 0, "total_ms": 0.0})
            total["n"] += d["n"]
            total["total_ms"] += d["total_ms"]
    for total in paired.values():
        total["mean_ms"] = total["total_ms"] / total["n"] if total["n"] else None
    return {
        "paired_delta_ms": paired,
        "traces": len(rows),
        "adaptive_over_oracle": ratio,
        "gain_captured": statistics.fmean(captured) if captured else None,
        "gain_traces": len(captured),
        # the same from the table scaled to the live best static run's level (before 2026-12-07:
        # the oracle then; see live_rounds for why it changed)
        "gain_captured_scaled": statistics.fmean(scaled) if scaled else None,
        "gain_traces_scaled": len(scaled),
        "lost": lost,
        "goals": {"adaptive_over_oracle": 1.10, "gain_captured": 0.8, "lost": 0, "traces": 10},
        "goals_met": {"adaptive_over_oracle": ratio <= 1.10,
                      "gain_captured": bool(captured) and statistics.fmean(captured) >= 0.8,
                      "lost": lost == 0, "traces": len(rows) >= 10},
    }


class Replay:
    """Applies a trace's rates to the device's link on schedule, in a thread."""

    def __init__(self, bed, samples, duration_s: float) -> None:
        self.bed, self.samples, self.duration_s = bed, samples, duration_s
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            started = time.monotonic()
            for t, rate in self.samples:
                if t >= self.duration_s or self._stop.wait(max(0.0, t - (time.monotonic() - started))):
                    break
                self.bed.shape("device", max(rate, MIN_RATE_MBIT), burst=tbf_burst(rate), latency=TBF_LATENCY_S)
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def start(self) -> Replay:
        first = max(rate_at(self.samples, 0.0), MIN_RATE_MBIT)  # a trace may start at 0 (link down)
        self.bed.shape("device", first, burst=tbf_burst(first), latency=TBF_LATENCY_S)
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)
        if self.error is not None:
            raise self.error


def run(quick: bool = False, progress: bool = True, config: dict | None = None, traces: str | None = None,
        device: str | None = None, window_s: float | None = None, model: str | None = None,
        window: str | None = None) -> dict:
    """``window_s``: seconds of each trace replayed (default 45, quick 10). Per-window means
    rest on 25-45 requests at 45 s, and one window's ``gain_captured`` moved by about 1
    between two runs: longer windows narrow it (the run time grows about in proportion)."""
    from edgesplit.partitioner.explain import DEVICE_QUOTAS
    from edgesplit.testbed.cgroups import smooth_period_us

    if os.geteuid() != 0:
        raise SystemExit("the controller benchmark builds network namespaces and CPU quotas: run it as root")
    config = dict(config or (QUICK if quick else FULL))
    if device is not None:
        config["device"] = device
    if window_s is not None:
        config["duration_s"] = float(window_s)
    if model is not None:
        config["model"] = model
    if window is not None:
        config["window"] = window
    folder = traces_folder(traces)
    chosen = check_options(quick, traces, device, window_s, count=config["traces"], model=model,
                           window=window)  # before any test bed
    work = Path(tempfile.mkdtemp(prefix="edgesplit-controller-"))
    q = DEVICE_QUOTAS[config["device"]]
    pause_s = 2 * smooth_period_us(q) / 1e6
    # This process (and the tc commands replaying the trace) stays off the device's core.
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {1})
    try:
        return _run(config, folder, chosen, work, q, pause_s, progress)
    finally:
        os.sched_setaffinity(0, affinity)


def _run(config, folder, chosen, work, q, pause_s, progress) -> dict:
    from edgesplit.linksim.traces import load_trace
    from edgesplit.partitioner.optimise import fewer_bytes_than_before
    from edgesplit.runtime.node.launcher import NodeProcess
    from edgesplit.testbed.bed import Testbed
    from edgesplit.testbed.cgroups import smooth_period_us

    rows = []
    with Testbed(hosts={"device": "198.18.0.1", "edge1": "198.18.0.11"}) as bed:
        node = NodeProcess(model=config["model"], host=bed.address("edge1"), port=EDGE_PORT, metrics_port=-1,
                           threads=1, command_prefix=[*bed.exec_prefix("edge1"), "taskset", "-c", "1"],
                           extra_args=["--random-weights", "--workers", "1"], log_path=work / "edge.log",
                           startup_timeout=300)
        with node:
            quota = bed.cpu_quota("device", 1.0, smooth_period_us(1.0))
            log = open(work / "device.log", "w")
            proc = bed.exec("device", ["taskset", "-c", "0", sys.executable, "-m",
                                       "edgesplit.bench.controller_device", "--model", config["model"],
                                       "--target", f"{bed.address('edge1')}:{EDGE_PORT}"],
                            cpu=quota, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
            device = DeviceProcess(proc, config["model"])
            try:
                edge = _edge_blocks(config["model"])
                bed.cpu_quota(quota, q, smooth_period_us(q))
                numels = device.hello["bytes"]
                last = len(numels) - 1
                # the rule of partitioner.optimise.undominated_cuts, on the model's block cuts
                candidates = [*fewer_bytes_than_before(dict(enumerate(numels[:-1]))), last]
                heads = device.ask(op="profile", repeats=config["profile_repeats"], pause_s=pause_s,
                                   edge=edge, cuts=candidates)["heads_ms"]
                plans = [[c, "int8"] for c in candidates]
                samples_ms: dict[float, dict[str, list[float]]] = {}
                for mbit in config["grid"]:
                    bed.shape("device", mbit, burst=tbf_burst(mbit), latency=TBF_LATENCY_S)
                    samples_ms[mbit] = device.ask(op="static", plans=plans, repeats=config["repeats"],
                                                  pause_s=pause_s)["samples_ms"]
                    if progress:
                        print(f"controller: table at {mbit:g} Mbit/s: " + ", ".join(
                            f"{k} {statistics.fmean(v):.0f} ms" for k, v in samples_ms[mbit].items()), flush=True)
                fits = fit_table(samples_ms, local=(f"{last}:int8",))
                # The controller chooses among the plans the measured table makes best somewhere
                # from the lowest rate shaped to the highest of the grid and the traces, as the
                # oracle does among the plans in turns.
                traces = {path: load_trace(path) for path in chosen}
                top = max(max(config["grid"]), *(rate for samples in traces.values() for _, rate in samples))
                envelope = envelope_plans(fits, MIN_RATE_MBIT, top)
                device.ask(op="restrict", cuts=[int(p.split(":")[0]) for p in envelope])
                modes = {"adaptive": "adaptive", "all_device": [last, "int8"], "all_edge": [0, "int8"]}
                for path, whole in traces.items():
                    how = config.get("window", "start")
                    start_s = window_by_gain(whole, fits, config["duration_s"]) if how == "gain" \
                        else window_start(whole, config["duration_s"], how)
                    samples = shifted(whole, start_s)
                    # The best static plan in hindsight (by the table, over the window's bandwidth),
                    # run in turns with the adaptive runner: the two see the same link and the same
                    # host at the same moments (single runs minutes apart differed by up to 30 %).
                    # That run is the level the oracle is anchored to (see analyse).
                    best = best_static_plan(samples, fits, window_times(config["duration_s"]))
                    # ... and the plan the table makes best (or near it) at most other moments, in
                    # the same rounds (each of _drive's runners records every turn or the op fails,
                    # so a run's i-th record is its request of round i):
                    # the oracle's latency at each round is its plan's request of that round.
                    in_turns = turn_plans(samples, fits, config["duration_s"], best)
                    same = {f"{mode[0]}:{mode[1]}": label for label, mode in modes.items() if label != "adaptive"}
                    labels = {plan: same.get(plan, plan) for plan in in_turns}
                    turns = replayed(bed, device, samples, [[int(p.split(":")[0]), p.split(":")[1]] for p in in_turns],
                                     config["duration_s"], pause_s, op="turns")
                    live = {"adaptive": turns["adaptive"]}
                    live.update((labels[p], run) for p, run in zip(in_turns, turns["static"]))
                    for label, mode in modes.items():
                        if label not in live:
                            live[label] = replayed(bed, device, samples, mode, config["duration_s"], pause_s)
                    row = analyse(f"{path.parent.name}/{path.name}", samples, fits, live, config["slo_ms"],
                                  config["model"], best_static_live=labels[best], best_static=best, rounds=labels)
                    row["window_start_s"] = start_s
                    rows.append(row)
                    if progress:
                        print(f"controller: {row['name']}: adaptive {row['adaptive_ms']:.0f} ms, oracle "
                              f"{row['oracle_ms']:.0f}, best static {row['best_static_ms']:.0f} "
                              f"({row['best_static_plan']}), device {row['all_device_ms']:.0f}, edge "
                              f"{row['all_edge_ms']:.0f}, {row['decisions']} decisions, "
                              f"{row['explorations']} trials", flush=True)
            finally:
                device.close()
                log.close()
                bed.unshape("device")
    return {"config": {**config, "grid": list(config["grid"]), "traces_folder": str(folder), "cpu_quota": q,
                       "pause_s": pause_s},
            "device_heads_ms": heads, "edge_blocks_ms": [1000 * t for t in edge], "controller_plans": envelope,
            "table_ms": {mbit: {p: statistics.fmean(v) for p, v in row.items()} for mbit, row in samples_ms.items()},
            "table_samples_ms": samples_ms,
            "table_fit": {p: {"fixed_ms": a, "ms_per_inverse_mbit": b} for p, (a, b) in fits.items()},
            "traces": rows, "summary": summarise(rows), "logs": str(work), "machine": machine_info()}


def replayed(bed, device, samples, mode, duration_s: float, pause_s: float, op: str = "run") -> dict:
    """One live run of ``mode`` on the device while ``samples`` are replayed on its link
    (``op="turns"``: the adaptive runner and the fixed plans ``mode`` taking turns)."""
    replay = Replay(bed, samples, duration_s).start()
    try:
        args = {"plans": mode} if op == "turns" else {"mode": mode}
        return device.ask(op=op, **args, duration_s=duration_s, pause_s=pause_s, timeout=duration_s + 600)
    finally:
        replay.stop()


def _edge_blocks(model_name: str, repeats: int = 5) -> list[float]:
    """Seconds per block on one core of this host, one thread (the edge node's), pinned to core 1."""
    code = ("import json, torch\n"
            "from edgesplit.models import build_model\n"
            "from edgesplit.runtime.control.policy import PlanSpace\n"
            "torch.set_num_threads(1); torch.manual_seed(0)\n"
            f"space = PlanSpace.for_model(build_model({model_name!r}).eval(), repeats={repeats})\n"
            "print(json.dumps(space.edge.seconds[1]))\n")
    done = subprocess.run(["taskset", "-c", "1", sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=600)
    return json.loads(done.stdout)


def render(result: dict) -> str:
    headers = ["trace", "Mbit/s", "adaptive ms", "oracle ms", "best static ms", "(plan)", "all-device ms",
               "all-edge ms", "SLO miss", "decisions", "trials", "raced (edge/device)", "sent", "answered"]
    body = [[r["name"], f"{r['mean_mbit']:.2f}", f"{r['adaptive_ms']:.0f}", f"{r['oracle_ms']:.0f}",
             f"{r['best_static_ms']:.0f}", r["best_static_plan"], f"{r['all_device_ms']:.0f}",
             f"{r['all_edge_ms']:.0f}", f"{r['slo_miss_rate']:.0%}", r["decisions"], r.get("explorations", 0),
             "{edge}/{device}".format(**r.get("raced", {"edge": 0, "device": 0})), r["sent"], r["answered"]]
            for r in result["traces"]]
    s = result["summary"]
    gain = "n/a (no trace where the oracle beats the best static by 5%)" if s["gain_captured"] is None \
        else f"{s['gain_captured']:.2f} over {s['gain_traces']} traces"
    c = result.get("config")
    heading = [] if c is None else [f"{c['model']} on the {c['device']} device class ({c['cpu_quota']:g} of a "
                                    f"core), {c['duration_s']:g} s of each trace"]
    if result.get("controller_plans"):
        heading.append("the controller chooses among " + ", ".join(result["controller_plans"])
                       + " (the plans the table makes fastest somewhere in the traces' range)")
    return "\n".join([*heading, table(headers, body), "",
                      f"adaptive / oracle: {s['adaptive_over_oracle']:.2f} (goal <= 1.10)",
                      f"gain captured: {gain} (goal >= 0.8)",
                      *([f"  against the table scaled to the best static run's level (the oracle before "
                         f"2026-12-07): {s['gain_captured_scaled']:.2f} over {s['gain_traces_scaled']} traces"]
                        if s.get("gain_captured_scaled") is not None else []),
                      f"lost: {s['lost']} (goal 0); traces: {s['traces']} (goal >= 10)",
                      *_paired_lines(s.get("paired_delta_ms") or {})])


def _paired_lines(paired: dict) -> list[str]:
    """The summary's paired deltas as one line (nothing when the runs were not paired)."""
    parts = [f"{kind.replace('_', ' ')} {d['n']} requests {d['mean_ms']:+.0f} ms" for kind, d in paired.items()
             if d["n"]]
    return ["adaptive against the paired fixed plan, by what it ran (mean per request): " + ", ".join(parts)] \
        if parts else []


def plot(result: dict, path: str) -> None:
    """Per trace, two panels: bandwidth (and the controller's estimate after each of its
    answers, where recorded) and latency per request; the adaptive plan's cut and
    the share of its answers that left at an early exit (over its last ``EXIT_RATE_OF``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["traces"]
    fig, axes = plt.subplots(2 * len(rows), 1, figsize=(9, 3.6 * len(rows)), squeeze=False,
                             gridspec_kw={"height_ratios": [2, 1] * len(rows)})
    duration = result["config"]["duration_s"]
    last = max((int(c) for c in result.get("device_heads_ms", {})), default=0)  # all on the device
    for i, r in enumerate(rows):
        ax, below = axes[2 * i, 0], axes[2 * i + 1, 0]
        trace = [(t, v) for t, v in r["trace"] if t <= duration]
        ax.step([t for t, _ in trace], [v for _, v in trace], where="post", color="0.4", label="bandwidth (Mbit/s)")
        recs = r["adaptive_records"]
        estimated = [(x["t"], x["est_mbit"]) for x in recs if "est_mbit" in x]
        if estimated:
            ax.step([t for t, _ in estimated], [v for _, v in estimated], where="post", color="tab:orange",
                    linestyle="--", label="controller's estimate")
            ax.legend(loc="upper left", fontsize=7)
        ax.set_ylabel("Mbit/s")
        ax.set_xlim(0, duration)
        lat = ax.twinx()
        lat.scatter([x["t"] for x in recs], [x["ms"] for x in recs], s=8, color="tab:red", label="latency (ms)")
        lat.set_ylabel("ms", color="tab:red")
        below.step([x["t"] for x in recs], [x["cut"] for x in recs], where="post", color="tab:blue")
        below.set_ylabel("cut", color="tab:blue")
        below.set_ylim(-0.5, last + 0.5)
        below.set_xlim(0, duration)
        exits = below.twinx()
        left = [str(x.get("exit", "final")).startswith("exit@") for x in recs]
        rate = [statistics.fmean(left[max(0, j - EXIT_RATE_OF + 1):j + 1]) for j in range(len(left))]
        exits.plot([x["t"] for x in recs], rate, color="tab:green")
        exits.set_ylim(-0.05, 1.05)
        exits.set_ylabel("exit rate", color="tab:green")
        ax.set_title(f"{r['name']}: adaptive {r['adaptive_ms']:.0f} ms, oracle {r['oracle_ms']:.0f}, best static "
                     f"{r['best_static_ms']:.0f}, device {r['all_device_ms']:.0f}, edge {r['all_edge_ms']:.0f}",
                     fontsize=8)
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

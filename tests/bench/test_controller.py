"""Controller benchmark: the table chooses the window and the plans in turns, the oracle and
the best static plan come from those plans' live fits and are measured in the same rounds
as the adaptive runner (the scaled table kept beside), gain captured counts only traces
where adapting can pay, traces are picked deterministically from any folder; a short real
run over the test bed answers every request (root only)."""

import os
import shutil
import statistics

import pytest

from edgesplit.bench.controller import (
    analyse,
    best_static_plan,
    envelope_plans,
    fit_table,
    live_rounds,
    paired_deltas,
    pick,
    rate_at,
    render,
    shifted,
    summarise,
    table_at,
    trace_files,
    turn_plans,
    window_by_gain,
    window_start,
)

SAMPLES = {1.0: {"0:int8": [900.0, 1100.0], "9:int8": [280.0, 320.0]},
           4.0: {"0:int8": [240.0, 260.0], "9:int8": [310.0, 330.0]}}
TABLE = fit_table(SAMPLES)


def test_a_plan_that_sends_nothing_gets_no_slope_whatever_its_samples():
    noisy = {0.25: {"0:int8": [5000.0], "20:int8": [190.0]}, 8.0: {"0:int8": [180.0], "20:int8": [110.0]}}
    fits = fit_table(noisy, local=("20:int8",))
    assert fits["20:int8"] == (150.0, 0.0)  # the mean, at every bandwidth
    assert fit_table(noisy)["20:int8"][1] > 0  # fitted as if it sent something
    assert fits["0:int8"][1] > 0


def test_the_table_is_fitted_linear_in_inverse_bandwidth_over_all_samples():
    assert TABLE["0:int8"] == pytest.approx((0.0, 1000.0))  # all transfer: 1000 ms per 1/Mbit
    assert table_at(TABLE, "0:int8", 2.0) == pytest.approx(500.0)
    assert table_at(TABLE, "0:int8", 0.5) == pytest.approx(2000.0)
    # all on the device: latency does not fall with bandwidth, so the noise is not a slope
    assert TABLE["9:int8"] == pytest.approx((310.0, 0.0))
    assert table_at(TABLE, "9:int8", 0.5) == pytest.approx(310.0)


def test_analysis_takes_oracle_and_best_static_at_the_adaptive_requests():
    samples = [(0.0, 1.0), (10.0, 4.0)]
    records = [{"t": t, "ms": ms, "cut": 9, "epoch": 1, "where": "device", "error": None}
               for t, ms in ((1, 310.0), (5, 300.0), (11, 260.0), (15, 255.0))]
    fixed = [{"t": 1.0, "ms": 300.0, "cut": 9, "epoch": 0, "where": "device", "error": None}]
    live = {"adaptive": {"records": records, "sent": 4, "decisions": [{"t": 10.5}]},
            "all_device": {"records": fixed, "sent": 1, "decisions": []},
            "all_edge": {"records": [], "sent": 1, "decisions": []}}
    live["all_edge"]["records"] = [{"t": 1.0, "ms": 900.0, "cut": 0, "epoch": 0, "where": "edge", "error": None}]
    row = analyse("t", samples, TABLE, live, slo_ms=305.0, model="m")
    assert row["oracle_ms"] == pytest.approx((310 + 310 + 250 + 250) / 4)
    assert row["best_static_plan"] == "9:int8" and row["best_static_ms"] == pytest.approx(310.0)
    assert row["slo_miss_rate"] == 0.25 and row["decisions"] == 1
    assert (row["sent"], row["answered"]) == (6, 6)
    s = summarise([row])
    assert s["lost"] == 0 and s["gain_traces"] == 1  # oracle 280 beats best static 310 by > 5 %
    assert s["gain_captured"] == pytest.approx((310 - row["adaptive_ms"]) / (310 - 280))
    assert "adaptive / oracle" in render({"traces": [row], "summary": s})


def test_the_live_best_static_run_anchors_the_oracle_at_its_level():
    samples = [(0.0, 1.0), (10.0, 4.0)]
    rec = lambda t, ms: {"t": t, "ms": ms, "cut": 9, "epoch": 1, "where": "device", "error": None}  # noqa: E731
    adaptive = [rec(1, 310.0), rec(5, 300.0), rec(11, 260.0), rec(15, 255.0)]
    assert best_static_plan(samples, TABLE, adaptive) == "9:int8"
    live = {"adaptive": {"records": adaptive, "sent": 4, "decisions": []},
            "all_device": {"records": [rec(1, 372.0)], "sent": 1, "decisions": []},  # 20 % slower than the table
            "all_edge": {"records": [rec(1, 900.0)], "sent": 1, "decisions": []}}
    row = analyse("t", samples, TABLE, live, slo_ms=1000.0, model="m", best_static_live="all_device")
    assert row["paired_delta_ms"]["same_plan"]["n"] == 4  # every adaptive request ran all on the device
    assert summarise([row])["paired_delta_ms"]["same_plan"]["mean_ms"] == pytest.approx(
        (310 + 300 + 260 + 255) / 4 - 372.0)
    assert "paired fixed plan" in render({"traces": [row], "summary": summarise([row])})
    assert row["best_static_ms"] == 372.0 and row["best_static_table_ms"] == pytest.approx(310.0)
    assert row["oracle_table_ms"] == pytest.approx(280.0)
    assert row["oracle_ms"] == pytest.approx(280.0 * 1.2)
    # the plan that ran live anchors the oracle, even where another fits the adaptive requests better
    edge = analyse("t", samples, TABLE, live, slo_ms=1000.0, model="m", best_static_live="all_edge",
                   best_static="0:int8")
    # (all on the edge ran; by the table all on the device was better at these requests: the
    # best static is taken at the level all on the edge ran, not at its worse mean)
    level = 900.0 / (sum(table_at(TABLE, "0:int8", b) for b in (1.0, 1.0, 4.0, 4.0)) / 4)
    assert edge["best_static_plan"] == "0:int8" and edge["best_static_plan_at_requests"] == "9:int8"
    assert edge["best_static_run_ms"] == 900.0 and edge["best_static_ms"] == pytest.approx(310.0 * level)
    assert edge["oracle_ms"] == pytest.approx(280.0 * level)


def test_the_controller_chooses_among_the_plans_the_table_makes_best_somewhere():
    fits = {"20:int8": (100.0, 0.0), "8:int8": (60.0, 100.0), "15:int8": (90.0, 50.0), "0:int8": (20.0, 1000.0),
            "5:int8": (58.0, 200.0)}
    # cut 8 beats the device above 2.5 Mbit/s; cut 15 is never best (above 5 Mbit/s it loses to
    # cut 8, below to the device), cut 0 only beyond 22.5 Mbit/s, cut 5 never (cut 8 beats it
    # below 50 Mbit/s, cut 0 above 21)
    assert envelope_plans(fits, 0.05, 8.0) == ["8:int8", "20:int8"]
    assert envelope_plans(fits, 0.05, 30.0) == ["0:int8", "8:int8", "20:int8"]
    assert envelope_plans(fits, 0.05, 2.0) == ["20:int8"]
    with pytest.raises(ValueError):
        envelope_plans(fits, 0.0, 8.0)


def test_the_plans_in_turns_are_the_best_static_and_every_plan_near_the_best_at_some_moment():
    fits = {**TABLE, "6:int8": (340.0, 0.0), "5:int8": (400.0, 0.0)}
    samples = [(0.0, 1.0), (10.0, 4.0)]  # 1 Mbit/s for 10 s: 9 best (310), 6 within 15 % (340); 4 Mbit/s: 0 (250)
    assert turn_plans(samples, fits, 30.0, best="9:int8", limit=3) == ["9:int8", "0:int8", "6:int8"]  # 5 never near
    assert turn_plans(samples, fits, 30.0, best="9:int8") == ["9:int8", "0:int8"]  # two by default
    assert turn_plans(samples, fits, 30.0, best="9:int8", near=0.05) == ["9:int8", "0:int8"]
    assert turn_plans(samples, fits, 30.0, best="5:int8", limit=2) == ["5:int8", "0:int8"]  # more moments first
    assert turn_plans([(0.0, 1.0)], fits, 30.0, best="9:int8", near=0.05) == ["9:int8"]
    # a plan best at some moments comes before one merely near the best at more of them
    steady = [(0.0, 1.0), (25.0, 4.0)]  # 1 Mbit/s for 25 s (9 best, 6 near), 4 Mbit/s for 5 s (0 best)
    assert turn_plans(steady, fits, 30.0, best="9:int8") == ["9:int8", "0:int8"]


def test_the_oracle_and_the_best_static_plan_are_chosen_by_live_fits_and_measured_in_the_same_rounds():
    samples = [(0.0, 1.0), (10.0, 4.0)]
    rec = lambda t, ms, cut=9: {"t": t, "ms": ms, "cut": cut, "epoch": 1, "where": "device", "error": None}  # noqa: E731
    adaptive = [rec(1, 300.0), rec(5, 320.0), rec(11, 270.0), rec(15, 260.0), rec(19, 900.0)]
    runs = {"9:int8": [rec(1.1, 330.0), rec(5.1, 290.0), rec(11.1, 340.0), rec(15.1, 300.0)],  # one round fewer
            "0:int8": [rec(1.2, 1000.0, 0), rec(5.2, 1100.0, 0), rec(11.2, 240.0, 0), rec(15.2, 230.0, 0),
                       rec(19.2, 250.0, 0)]}
    out = live_rounds(samples, adaptive, runs, local=("9:int8",))
    assert out["rounds"] == 4  # the adaptive request of an incomplete round is left out
    assert out["adaptive_ms"] == pytest.approx((300 + 320 + 270 + 260) / 4)
    # live fits: 9 flat at 315; 0 about 1050 at 1 Mbit/s and 235 at 4
    assert out["oracle_plans"] == {"9:int8": 2, "0:int8": 2}
    assert out["oracle_ms"] == pytest.approx((330 + 290 + 240 + 230) / 4)  # each round's own request
    assert out["best_static_plan"] == "9:int8" and out["best_static_ms"] == pytest.approx(315.0)
    assert out["turns_ms"]["0:int8"] == pytest.approx((1000 + 1100 + 240 + 230) / 4)
    # live, 9 runs at 200 (the table has it at 310): the oracle takes it at 4 Mbit/s too,
    # where by the table 0 (250) would win
    faster = {**runs, "9:int8": [rec(t, ms) for t, ms in ((1.1, 190.0), (5.1, 210.0), (11.1, 200.0), (15.1, 200.0))]}
    assert live_rounds(samples, adaptive, faster, local=("9:int8",))["oracle_plans"] == {"9:int8": 4}
    live = {"adaptive": {"records": adaptive, "sent": 5, "decisions": []},
            "all_device": {"records": runs["9:int8"], "sent": 5, "decisions": []},
            "all_edge": {"records": runs["0:int8"], "sent": 5, "decisions": []}}
    row = analyse("t", samples, TABLE, live, slo_ms=1000.0, model="m", best_static_live="all_edge",
                  best_static="0:int8", rounds={"9:int8": "all_device", "0:int8": "all_edge"})
    assert (row["oracle_ms"], row["best_static_ms"], row["adaptive_ms"]) == pytest.approx(
        (out["oracle_ms"], out["best_static_ms"], out["adaptive_ms"]))
    assert row["best_static_plan"] == "9:int8" and row["best_static_plan_table"] == "0:int8"
    assert row["rounds"]["rounds"] == 4 and row["sent"] - row["answered"] == 1  # the 9:int8 run lost one
    # the table scaled to the level of the table's best static plan's run is kept beside it
    level = statistics.fmean([1000.0, 1100.0, 240.0, 230.0, 250.0]) / statistics.fmean(
        table_at(TABLE, "0:int8", rate_at(samples, r["t"])) for r in adaptive)
    scaled_oracle = statistics.fmean(min(table_at(TABLE, p, rate_at(samples, r["t"])) for p in TABLE)
                                     for r in adaptive)
    assert row["oracle_scaled_ms"] == pytest.approx(scaled_oracle * level)
    s = summarise([row])
    assert s["gain_captured"] == pytest.approx((out["best_static_ms"] - out["adaptive_ms"])
                                               / (out["best_static_ms"] - out["oracle_ms"]))
    assert s["gain_captured_scaled"] is not None and s["gain_captured_scaled"] != s["gain_captured"]


def test_paired_deltas_compare_each_adaptive_request_with_its_fixed_neighbours_by_what_it_ran():
    rec = lambda t, ms, cut, where, epoch=1: {"t": t, "ms": ms, "cut": cut, "epoch": epoch,  # noqa: E731
                                              "where": where, "error": None}
    static = [rec(0.0, 300.0, 8, "edge"), rec(2.0, 340.0, 8, "edge"), rec(4.0, 320.0, 8, "edge")]
    adaptive = [rec(1.0, 310.0, 8, "edge"),  # the fixed plan's own: 10 ms faster than 300/340
                rec(3.0, 400.0, 20, "device"),  # all on the device: another plan
                rec(3.5, 330.0, 5, "edge", epoch=2),  # a trial
                rec(3.8, 1330.0, 8, "device-fallback"),
                rec(5.0, 320.0, 8, "edge")]  # after the last fixed request: compared with it alone
    out = paired_deltas(adaptive, static, 20, [{"epoch": 2, "explore": True}])
    # an early exit answered on the device before the cut: not a fallback
    exited = paired_deltas([rec(1.0, 50.0, 8, "device")], static, 20, [])
    assert exited["other_plan"]["n"] == 1 and exited["fallback"]["n"] == 0
    assert out["same_plan"] == {"n": 2, "mean_ms": pytest.approx(-5.0), "total_ms": pytest.approx(-10.0)}
    assert out["other_plan"]["n"] == 1 and out["other_plan"]["mean_ms"] == pytest.approx(70.0)
    assert out["trial"]["mean_ms"] == pytest.approx(0.0) and out["fallback"]["mean_ms"] == pytest.approx(1000.0)
    # a fixed plan all on the device: the adaptive runner on the device is the same plan
    on_device = paired_deltas([rec(1.0, 310.0, 20, "device")], [rec(0.0, 300.0, 20, "device")], 20, [])
    assert on_device["same_plan"]["n"] == 1 and on_device["other_plan"]["n"] == 0


def test_the_widest_window_is_where_the_bandwidth_swings_most():
    trace = [(0.0, 2.0), (10.0, 2.1), (20.0, 1.9), (30.0, 0.2), (40.0, 4.0), (50.0, 2.0), (90.0, 2.0)]
    assert window_start(trace, 30.0, "start") == 0.0
    start = window_start(trace, 30.0)
    assert start in (20.0, 30.0)  # a window holding both 0.2 and 4.0
    moved = shifted(trace, 25.0)
    assert moved[0] == (0.0, 1.9) and moved[1] == (5.0, 0.2) and rate_at(moved, 16.0) == 4.0
    assert window_start([(0.0, 1.0), (5.0, 0.1)], 30.0) == 0.0  # shorter than the window
    with pytest.raises(ValueError, match="window"):
        window_start(trace, 30.0, "middle")


def test_traces_are_picked_evenly_and_rates_hold_until_the_next_sample(tmp_path):
    for i in range(7):
        (tmp_path / f"t{i}.txt").write_text("0 1.0\n5 0\n")
    files = trace_files(tmp_path)
    assert [p.name for p in pick(files, 3)] == ["t0.txt", "t3.txt", "t6.txt"]
    assert pick(files, 10) == files
    assert rate_at([(0.0, 2.0), (5.0, 0.0)], 4.9) == 2.0
    assert rate_at([(0.0, 2.0), (5.0, 0.0)], 5.0) == 0.05  # a zero is the link down: shaped to the floor
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no traces"):
        trace_files(tmp_path / "empty")
    (tmp_path / ".gitkeep").write_text("")  # hidden files are not traces (it was picked first, then failed)
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "old.txt").write_text("junk\n")
    assert [p.name for p in trace_files(tmp_path)] == [f"t{i}.txt" for i in range(7)]
    with pytest.raises(ValueError, match="not a folder"):
        trace_files(tmp_path / "t0.txt")


def _widest_by_every_window(samples, duration_s):
    """The definition, window by window (what window_start computed, quadratically, before)."""
    best, best_ratio = 0.0, 0.0
    for t0, _ in samples:
        if t0 + duration_s > samples[-1][0]:
            break
        rates = [rate_at(samples, t0)] + [max(r, 0.05) for t, r in samples if t0 < t < t0 + duration_s]
        if max(rates) / min(rates) > best_ratio:
            best, best_ratio = t0, max(rates) / min(rates)
    return best


def test_the_widest_window_in_one_pass_matches_the_definition():
    import random

    rng = random.Random(7)
    for _ in range(200):
        t, trace = 0.0, []
        for _ in range(rng.randint(1, 60)):
            trace.append((t, rng.choice([0.0, 0.01, rng.uniform(0.05, 10.0), rng.uniform(0.05, 10.0)])))
            t += rng.choice([0.5, 1.0, 2.0, 7.5])
        duration = rng.choice([1.0, 5.0, 10.0, 30.0])
        assert window_start(trace, duration) == _widest_by_every_window(trace, duration)
    long = [(i * 0.5, 1.0 + (i % 97) / 10) for i in range(200_000)]  # quadratic, this took hours
    assert window_start(long, 45.0) >= 0.0


FITS = {"0:int8": (25.0, 1249.0), "5:int8": (190.0, 243.0), "8:int8": (311.0, 97.0), "20:int8": (525.0, 0.0)}


def _gain_by_every_window(samples, fits, duration_s, step_s=0.1):
    """The definition, at every start on the grid: the oracle's share below the best fixed plan."""
    best, best_share = 0.0, -1.0
    for i in range(int(samples[-1][0] / step_s) + 1):
        t0 = i * step_s
        if t0 + duration_s > samples[-1][0] + 1e-9:
            break
        moments = [rate_at(samples, t0 + j * step_s) for j in range(int(round(duration_s / step_s)))]
        static = min(statistics.fmean(table_at(fits, p, b) for b in moments) for p in fits)
        oracle = statistics.fmean(min(table_at(fits, p, b) for p in fits) for b in moments)
        if (static - oracle) / static > best_share + 1e-9:
            best, best_share = t0, (static - oracle) / static
    return best


def test_the_window_where_adapting_gains_most_matches_the_definition():
    import random

    rng = random.Random(11)
    for _ in range(40):
        t, trace = 0.0, []
        for _ in range(rng.randint(2, 25)):
            trace.append((t, rng.choice([0.0, rng.uniform(0.05, 10.0), rng.uniform(0.05, 10.0)])))
            t += rng.choice([0.5, 1.0, 2.0])
        duration = rng.choice([1.0, 3.0, 5.0])
        assert window_by_gain(trace, FITS, duration) == pytest.approx(_gain_by_every_window(trace, FITS, duration))
    # a steady stretch, then a swing across the plans' crossovers: the window covers the swing
    trace = [(float(t), 1.0) for t in range(60)] + [(60.0 + t, 8.0 if t % 10 < 5 else 0.2) for t in range(40)]
    assert window_by_gain(trace, FITS, 20.0) >= 40.0
    assert window_by_gain([(0.0, 1.0), (5.0, 0.1)], FITS, 30.0) == 0.0  # shorter than the window
    # a trace too long for the grid is sampled coarser, and still finds its swing
    long = [(float(t), 1.0) for t in range(20_000)] + [(20_000.0 + t, 8.0 if t % 40 < 20 else 0.2)
                                                        for t in range(400)] + [(20_400.0, 1.0), (21_000.0, 1.0)]
    assert 19_700 <= window_by_gain(long, FITS, 300.0, max_points=10_000) <= 20_400
    # the window ending exactly at the trace's end is a candidate (23 * 0.1 > 2.3 in floats)
    assert window_by_gain([(0.0, 1.0), (2.0, 1.0), (2.3, 8.0), (4.3, 0.2), (4.6, 0.2)], FITS, 2.3) \
        == pytest.approx(_gain_by_every_window([(0.0, 1.0), (2.0, 1.0), (2.3, 8.0), (4.3, 0.2), (4.6, 0.2)],
                                               FITS, 2.3))


def test_a_malformed_trace_is_found_before_any_test_bed_is_built(tmp_path):
    from edgesplit.bench import BenchmarkArgumentError, run_benchmark

    (tmp_path / "a.txt").write_text("0 1.0\n1 2.0\n")
    (tmp_path / "b.txt").write_text("0 1.0\n1 fast\n")
    with pytest.raises(BenchmarkArgumentError, match="b.txt:2"):  # before the root check, the bed, the table
        run_benchmark("controller", quick=True, progress=False, traces=str(tmp_path))


def test_a_model_the_test_bed_cannot_split_is_refused_before_anything_starts():
    from edgesplit.bench import BenchmarkArgumentError, run_benchmark

    with pytest.raises(BenchmarkArgumentError, match="--model must be one of mobilenet_v2, resnet18, resnet_fm"):
        run_benchmark("controller", quick=True, progress=False, model="vgg16")
    with pytest.raises(BenchmarkArgumentError, match="--window must be one of gain, widest, start"):
        run_benchmark("controller", quick=True, progress=False, window="middle")


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("taskset"),
                    reason="needs root, iproute2 and taskset (network namespaces, CPU quotas)")
def test_a_short_run_answers_every_request_and_the_controller_decides(tmp_path):
    from edgesplit.bench.controller import run

    (tmp_path / "drop.txt").write_text("0 8.0\n4 0.3\n")
    config = {"model": "mobilenet_v2", "device": "mcu", "traces": 1, "duration_s": 8.0, "grid": (0.3, 8.0),
              "repeats": 1, "profile_repeats": 1, "slo_ms": 1000.0}
    result = run(config=config, progress=False, traces=str(tmp_path))
    (row,) = result["traces"]
    assert row["sent"] == row["answered"] > 0 and result["summary"]["lost"] == 0
    assert row["decisions"] >= 1  # it left the all-on-device start at 8 Mbit/s
    # it chose only among the plans the measured table makes best somewhere
    plans = {int(p.split(":")[0]) for p in result["controller_plans"]}
    assert plans and {r["cut"] for r in row["adaptive_records"][1:]} <= plans | {row["adaptive_records"][0]["cut"]}
    assert plans < {int(k) for k in result["device_heads_ms"]}  # some candidate was left out
    # the best static plan ran in turns with the adaptive runner: their requests interleave
    static_t = [r["t"] for r in row["best_static_records"]]
    adaptive_t = [r["t"] for r in row["adaptive_records"]]
    assert static_t and abs(len(static_t) - len(adaptive_t)) <= 1
    assert all(r["est_mbit"] > 0 for r in row["adaptive_records"])  # the estimate after each answer
    assert all(a < b for a, b in zip(adaptive_t, static_t)) and all(b < a for b, a in zip(static_t, adaptive_t[1:]))
    assert set(row) >= {"name", "model", "adaptive_ms", "oracle_ms", "best_static_ms", "all_device_ms",
                        "all_edge_ms", "slo_miss_rate", "sent", "answered", "decisions"}


@pytest.mark.parametrize("window_s", [0, -5.0, float("nan"), float("inf"), 0.05, 1e9])
def test_a_window_that_is_not_a_usable_length_is_refused_before_anything_starts(window_s):
    from edgesplit.bench import controller

    with pytest.raises(ValueError, match="--window-s"):  # 0.05 s held no request, and failed after the table
        controller.run(window_s=window_s)

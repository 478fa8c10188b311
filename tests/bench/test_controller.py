"""Controller benchmark: the oracle and the best static plan come from the table at the
adaptive requests' bandwidths, gain captured counts only traces where adapting can pay,
traces are picked deterministically from any folder; a short real run over the test bed
answers every request (root only)."""

import os
import shutil

import pytest

from edgesplit.bench.controller import analyse, pick, rate_at, render, summarise, table_at, trace_files

TABLE = {1.0: {"0:int8": 1000.0, "9:int8": 300.0}, 4.0: {"0:int8": 250.0, "9:int8": 300.0}}


def test_table_is_linear_in_inverse_bandwidth_and_clamped_above():
    assert table_at(TABLE, "0:int8", 1.0) == 1000.0 and table_at(TABLE, "0:int8", 4.0) == 250.0
    assert table_at(TABLE, "0:int8", 2.0) == pytest.approx(500.0)  # half way in 1/b
    assert table_at(TABLE, "0:int8", 100.0) == 250.0
    assert table_at(TABLE, "0:int8", 0.5) == pytest.approx(2000.0)  # extrapolated along 1/b
    assert table_at(TABLE, "9:int8", 0.5) == pytest.approx(300.0)


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
    assert row["oracle_ms"] == pytest.approx((300 + 300 + 250 + 250) / 4)
    assert row["best_static_plan"] == "9:int8" and row["best_static_ms"] == 300.0
    assert row["slo_miss_rate"] == 0.25 and row["decisions"] == 1
    assert (row["sent"], row["answered"]) == (6, 6)
    s = summarise([row])
    assert s["lost"] == 0 and s["gain_traces"] == 1  # oracle 275 beats best static 300 by > 5 %
    assert s["gain_captured"] == pytest.approx((300 - row["adaptive_ms"]) / (300 - 275))
    assert "adaptive / oracle" in render({"traces": [row], "summary": s})


def test_traces_are_picked_evenly_and_rates_hold_until_the_next_sample(tmp_path):
    for i in range(7):
        (tmp_path / f"t{i}.txt").write_text("0 1.0\n5 0\n")
    files = trace_files(tmp_path)
    assert [p.name for p in pick(files, 3)] == ["t0.txt", "t3.txt", "t6.txt"]
    assert pick(files, 10) == files
    assert rate_at([(0.0, 2.0), (5.0, 0.0)], 4.9) == 2.0
    assert rate_at([(0.0, 2.0), (5.0, 0.0)], 5.0) == 0.05  # a zero is the link down: shaped to the floor
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no traces"):
        trace_files(tmp_path / "empty")


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
    assert set(row) >= {"name", "model", "adaptive_ms", "oracle_ms", "best_static_ms", "all_device_ms",
                        "all_edge_ms", "slo_miss_rate", "sent", "answered", "decisions"}

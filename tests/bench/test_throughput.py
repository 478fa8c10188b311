"""Throughput benchmark: the load generator's summary and the goals are computed from what
was measured (no servers here; the benchmark itself runs the real node)."""

import pytest

from edgesplit.bench.loadgen import summarise
from edgesplit.bench.throughput import CONCURRENCY, MODELS, goals, render


def test_summary_counts_answers_refusals_and_overhead():
    samples = [(0.0, 0.010, "OK", 0.004), (0.1, 0.020, "OK", 0.005), (0.2, 0.003, "RESOURCE_EXHAUSTED", 0.0),
               (0.3, 0.004, "RESOURCE_EXHAUSTED", 0.0), (0.4, 0.5, "DEADLINE_EXCEEDED", 0.0)]
    s = summarise(samples, window=2.0)
    assert s["ok"] == 2 and s["rps"] == 1.0 and s["errors"] == 3
    assert s["errors_by_code"] == {"RESOURCE_EXHAUSTED": 2, "DEADLINE_EXCEEDED": 1}
    assert s["reject_p50_ms"] in (3.0, 4.0) and s["edge_compute_p50_ms"] in (4.0, 5.0)
    assert s["overhead_p50_ms"] in (6.0, 15.0)
    assert summarise([(0.0, 0.01, "OK", 0.0)], 1.0)["reject_p50_ms"] is None


def test_goals_are_ratios_of_the_measured_levels():
    levels = [{"model": m, "batching": b, "concurrency": c, "rps": 100.0 * c if b else 50.0 * c, "p50_ms": 1.0,
               "p99_ms": 2.0, "errors": 0, "reject_p50_ms": 3.0 if c == 128 else None}
              for m in MODELS for b in (True, False) for c in CONCURRENCY]
    g = goals(levels, {"resnet_fm": 6400.0, "resnet_fm.from.4": 9000.0}, empty_call=0.5, overhead=0.7)
    assert g["batched_over_unbatched_c32"] == 2.0
    assert g["batched_c32_share_of_ceiling"] == 0.5
    assert g["c128_goodput_share_of_c32"] == 4.0 and g["c128_reject_p50_ms"] == 3.0
    assert g["overhead_minus_empty_ms"] == pytest.approx(0.2)
    result = {"levels": levels, "ceiling_ips": {"resnet_fm": 6400.0, "resnet_fm.from.4": 9000.0},
              "empty_call_ms": 0.5, "overhead_ms": 0.7, "goals": g, "nodes": {}}
    assert "refusal p50 ms" in render(result) and "(>= 2)" in render(result)
    assert "reference server" not in render(result)
    result["overhead_floor"] = {"sync": {"empty_call_ms": 0.5, "overhead_ms": 0.6, "excess_ms": 0.1}}
    assert "sync 0.6 - 0.5 = 0.1 ms" in render(result)

"""Chaos benchmark: the analysis counts what it should; a short real run over the test bed
loses nothing (root only: it builds network namespaces)."""

import os
import shutil

import pytest

from edgesplit.bench.chaos import analyse, render


def rec(i, t, where, diff=0.0, error=None):
    return {"id": i, "t": t, "where": where, "exit": "final", "prediction": 1, "label": 1, "latency": 0.01,
            "device": 0.005, "transfer": 0.003, "edge": 0.002, "error": error, "max_abs_diff": diff}


def test_analysis_counts_losses_duplicates_differences_and_recoveries():
    records = [rec(0, 1.0, "edge"), rec(1, 2.0, "device-fallback", error="UNAVAILABLE"), rec(1, 2.1, "edge"),
               rec(3, 3.5, "edge", diff=0.2), rec(4, 4.0, "edge")]
    events = [{"t": 1.5, "kind": "link_down", "target": "device"}, {"t": 3.0, "kind": "link_up", "target": "device"}]
    r = analyse(records, sent=5, events=events)
    assert r["lost"] == 1 and r["duplicated"] == 1  # id 2 missing, id 1 twice
    assert r["differing_from_local"] == 1
    assert r["recovery_to_first_offload_s"] == [pytest.approx(0.5)]
    assert r["offload_errors"] == {"UNAVAILABLE": 1}
    assert "lost" in render({**r, "node_killed_at_request": None})


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"), reason="needs root and iproute2 (network namespaces)")
def test_short_chaos_run_loses_nothing():
    from edgesplit.bench.chaos import run

    r = run(requests=400, progress=False, seed=1)
    assert r["sent"] == r["answered"] == 400
    assert r["lost"] == 0 and r["duplicated"] == 0
    assert r["differing_from_local"] == 0
    assert r["where"].get("edge", 0) > 0
    assert any(e["kind"] == "node_killed" for e in r["events"])

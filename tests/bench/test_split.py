"""Split benchmark: the summary counts rows the way the issue defines them, the table and
plot render, and a short real run over the test bed (device under a CPU quota behind tbf,
edge node profiled over the control service) measures every candidate cut and the choice
(root only: it builds network namespaces and cgroups)."""

import json
import os
import shutil

import pytest

from edgesplit.bench.split import kind, plot, render, summarise

ROW_KEYS = {"model", "device", "bandwidth_mbit", "chosen_cut", "chosen_ms", "best_cut", "best_ms", "all_device_ms",
            "all_edge_ms", "predicted_over_measured", "speedup_vs_all_device", "speedup_vs_all_edge"}


def row(best_kind, chosen_ms, best_ms, ratio, chosen_kind="device"):
    return {"model": "m", "device": "pi4", "cpu_quota": 0.6, "bandwidth_mbit": 1.0, "best_kind": best_kind,
            "chosen_kind": chosen_kind, "chosen_cut": 3, "best_cut": 3, "chosen_ms": chosen_ms, "best_ms": best_ms,
            "all_device_ms": 10.0, "all_edge_ms": 20.0, "within_10pct": chosen_ms <= 1.1 * best_ms,
            "predicted_over_measured": ratio, "speedup_vs_all_device": 10.0 / chosen_ms,
            "speedup_vs_all_edge": 20.0 / chosen_ms}


def test_summary_counts_choices_within_ten_percent_and_the_kinds_of_best_plan():
    rows = [row("device", 10.0, 10.0, 1.0), row("edge", 11.0, 10.0, 0.9), row("intermediate", 12.0, 10.0, 1.5),
            row("device", 10.0, 10.0, 1.1)]
    s = summarise(rows)
    assert s["share_within_10pct"] == 0.75  # 12 ms against a best of 10 is 20 % off
    assert s["median_predicted_over_measured"] == pytest.approx(1.05)
    assert s["best_kinds"] == {"device": 2, "intermediate": 1, "edge": 1}
    assert s["goals_met"] == {"share_within_10pct": False, "median_predicted_over_measured": True,
                              "best_kinds": True}
    assert not summarise(rows[:2])["goals_met"]["best_kinds"]  # no intermediate best
    assert (kind(0, 9), kind(4, 9), kind(9, 9)) == ("edge", "intermediate", "device")


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("taskset"),
                    reason="needs root, iproute2 and taskset (network namespaces, CPU quotas)")
def test_a_short_run_over_the_test_bed_measures_every_candidate_and_the_choice(tmp_path):
    from edgesplit.bench.split import run
    from edgesplit.partitioner.cuts import enumerate_cuts
    from edgesplit.partitioner.graph import trace
    from edgesplit.partitioner.optimise import undominated_cuts

    config = {"models": ("resnet_fm",), "devices": ("mcu",), "bandwidths": (0.5, 100.0), "repeats": 1,
              "warmup": 1, "device_profile_repeats": 2, "segment_repeats": 1, "edge_profile_repeats": 2}
    result = run(config=config, progress=False)
    json.loads(json.dumps(result))  # the contract is JSON
    assert len(result["rows"]) == 2
    import torch

    from edgesplit.models import build_model

    model = build_model("resnet_fm").eval()
    cuts = enumerate_cuts(trace(model, (torch.zeros(1, 1, 28, 28),)))
    candidates = set(undominated_cuts(cuts))
    for r in result["rows"]:
        assert ROW_KEYS <= set(r)
        measured = {c["cut"] for c in r["cuts"]}
        assert candidates | {r["chosen_cut"]} == measured
        assert all(c["measured_ms"] > 0 and c["predicted_ms"] > 0 and len(c["samples_ms"]) == 1 for c in r["cuts"])
        assert r["best_ms"] == min(c["measured_ms"] for c in r["cuts"])
        assert r["all_device_ms"] == next(c["measured_ms"] for c in r["cuts"] if c["cut"] == cuts[-1].index)
    slow, fast = result["rows"]
    assert (slow["bandwidth_mbit"], fast["bandwidth_mbit"]) == (0.5, 100.0)
    assert slow["rtt_ms"] > 0 and fast["rtt_ms"] > 0  # the fixed cost of an offload, measured per link
    # the device profile was taken under the quota, the edge's on the node
    profiles = result["profiles"]["resnet_fm"]
    assert profiles["mcu"]["cpu_quota"] == 0.05 and profiles["edge"]["threads"] == 1
    assert set(result["summary"]) >= {"share_within_10pct", "median_predicted_over_measured", "best_kinds"}
    assert "within 10% of the measured best" in render(result)
    plot(result, str(tmp_path / "split.png"))
    assert (tmp_path / "split.png").stat().st_size > 10_000

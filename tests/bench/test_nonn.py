"""NoNN benchmark: failure sets, the failure curve, the goals and the stream analysis count what
they should; a short live multi-host run with a tiny ensemble kills and restarts half the
members mid-stream and answers every request once (root only: it builds network namespaces)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from edgesplit.bench.nonn import analyse_stream, failure_curve, failure_sets, goals, multihost, render
from edgesplit.models.datasets import load_fashion_mnist, to_tensor


def test_failure_sets_are_exhaustive_up_to_the_cap_then_a_fixed_sample():
    assert len(failure_sets(8, 4)) == 70 and len(set(failure_sets(8, 4))) == 70
    sampled = failure_sets(12, 6)
    assert len(sampled) == 100 == len(set(sampled)) and sampled == failure_sets(12, 6)
    assert failure_sets(4, 0) == [()]


def test_failure_curve_matches_a_direct_evaluation(tiny_nonn):
    images, labels = load_fashion_mnist("test")
    x, y = to_tensor(images[:200]), torch.from_numpy(labels[:200]).long()
    rows = failure_curve(tiny_nonn, x, y)
    assert [r["failed"] for r in rows] == [0, 1, 2, 3]
    assert [r["failure_sets"] for r in rows] == [math.comb(4, k) for k in range(4)]
    with torch.no_grad():
        answers = {i: s(x) for i, s in enumerate(tiny_nonn.students)}
        all_up = (tiny_nonn.aggregator.combine(answers).argmax(1) == y).float().mean()
        only = [(tiny_nonn.aggregator.combine({i: answers[i]}).argmax(1) == y).float().mean() for i in range(4)]
    assert rows[0]["accuracy"] == pytest.approx(float(all_up), abs=1e-4)
    assert rows[3]["accuracy"] == pytest.approx(float(sum(only) / 4), abs=1e-4)
    assert rows[3]["min_accuracy"] <= rows[3]["accuracy"] <= rows[3]["max_accuracy"]


def test_goals_compare_the_partitionings_at_half_failed():
    rows = [{"partitioning": p, "members": 4, "failed": f, "accuracy": a, "failure_sets": 1}
            for p, f, a in (("enhanced", 0, 0.9), ("enhanced", 2, 0.81), ("original", 0, 0.9), ("original", 2, 0.7))]
    g = goals(rows)["S4"]
    assert g["enhanced_retention"] == pytest.approx(0.9) and g["margin_points"] == pytest.approx(11.0)
    text = render({"rows": rows, "teacher_accuracy": 0.93, "goals": {"S4": g}})
    assert "90.0% of its all-up accuracy" in text and "+11.00 points" in text


def test_stream_analysis_counts_losses_duplicates_and_the_outage():
    recs = [{"id": i, "t": float(i), "how": "all" if i < 2 else "partial", "answered": [0, 1] if i < 2 else [0],
             "correct": True, "latency_s": 0.01} for i in range(5)]
    recs.append(dict(recs[3]))
    recs.append({"id": 5, "t": 5.0, "error": "RuntimeError('boom')"})  # issued, no answer
    events = [{"event": "killed", "answered": 2, "t": 1.5}, {"event": "restarted", "answered": 4, "t": 3.5}]
    r = analyse_stream(recs, sent=7, events=events, members=2)
    assert r["lost"] == 2 and r["duplicated"] == 1 and r["answered"] == 5 and r["errors"] == ["RuntimeError('boom')"]
    assert r["answers_while_down"] == 3 and r["mean_members_answering_while_down"] == 1.0
    assert r["all_members_back_s"] is None and r["restarted_mid_stream"] is True


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
def test_multihost_run_answers_every_request_while_members_are_killed(tiny_nonn):
    r = multihost(str(tiny_nonn.manifest_path), requests=240, latency_requests=5, rate=40.0, progress=False)
    assert r["sent"] == r["answered"] >= 240 and r["lost"] == 0 and r["duplicated"] == 0
    assert r["restarted_mid_stream"] and r["all_members_back_s"] is not None  # the restart was seen live
    assert len(r["victims"]) == 2 and r["killed_at_answer"] >= 60
    assert r["answers_while_down"] > 0 and r["mean_members_answering_while_down"] < 4
    assert r["how"]["partial"] > 0 and set(r["latency"]) == {"nonn", "cut0", "cut4"}


def test_goals_can_compare_against_another_set_of_original_rows():
    def curve(method, at_half):
        return [{"partitioning": method, "members": 4, "failed": f, "accuracy": a} for f, a in ((0, 0.9), (2, at_half))]

    enhanced, same, other = curve("enhanced", 0.85), curve("original", 0.84), curve("original", 0.6)
    assert goals(enhanced + same)["S4"]["margin_points"] == pytest.approx(1.0)
    assert goals(enhanced + same, other)["S4"]["margin_points"] == pytest.approx(25.0)
    assert goals(same) == {}  # nothing enhanced to compare

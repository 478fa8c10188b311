"""The accuracy benchmark reports per-exit and cascade figures for the shipped weights."""

import json

from edgesplit.bench import run_benchmark


def test_accuracy_benchmark_quick_writes_json(tmp_path, capsys):
    out = tmp_path / "acc.json"
    result = run_benchmark("accuracy", quick=True, json_path=str(out), progress=False)
    saved = json.loads(out.read_text())
    assert saved["images"] == 2000 and saved["benchmark"] == "accuracy"
    assert [e["name"] for e in saved["exits"]] == ["exit@4", "exit@7", "final"]
    assert result["final_accuracy"] >= 0.9
    for c in saved["cascade"]:
        assert abs(sum(c["exit_shares"]) - 1.0) < 1e-9
    low, high = saved["cascade"][0], saved["cascade"][-1]
    assert low["exit_shares"][0] >= high["exit_shares"][0], "a lower threshold exits earlier"
    assert "final exit" in capsys.readouterr().out

"""The benchmark runner (edgesplit.bench.run_benchmark): options a benchmark does not take
are refused before it runs, and its JSON is written whole or not at all."""

from __future__ import annotations

import json
import types

import pytest

import edgesplit.bench as bench


def fake_benchmark(result: dict, fail_render: bool = False):
    def run(quick=False, progress=True, traces=None):
        return dict(result)

    def render(r):
        if fail_render:
            raise KeyboardInterrupt  # interrupted after the run, before anything was written
        return "table"

    return types.SimpleNamespace(run=run, render=render)


def test_results_are_written_whole_and_an_interruption_keeps_the_earlier_ones(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    monkeypatch.setattr(bench, "load", lambda name: fake_benchmark({"value": 1}))
    bench.run_benchmark("fake", json_path=str(out), progress=False)
    assert json.loads(out.read_text())["value"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left
    monkeypatch.setattr(bench, "load", lambda name: fake_benchmark({"value": 2}, fail_render=True))
    with pytest.raises(KeyboardInterrupt):
        bench.run_benchmark("fake", json_path=str(out), progress=False)
    assert json.loads(out.read_text())["value"] == 1


def test_an_option_the_benchmark_does_not_take_is_refused_before_it_runs(monkeypatch):
    ran = []
    module = fake_benchmark({})
    module.run = lambda quick=False, progress=True: ran.append(1) or {}
    monkeypatch.setattr(bench, "load", lambda name: module)
    with pytest.raises(bench.BenchmarkArgumentError, match="--device, --window-s do not apply"):
        bench.run_benchmark("fake", device="pi4", window_s=5.0, traces=None)
    assert ran == []

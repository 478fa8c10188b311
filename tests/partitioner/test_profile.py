"""Profiles: per-node medians that add up to the measured whole, larger batches cost more,
the JSON round-trips and records where it was taken."""

from __future__ import annotations

import json
import time

import pytest
import torch

from edgesplit.models import build_model
from edgesplit.partitioner.graph import trace
from edgesplit.partitioner.profile import Profile, profile_graph


@pytest.fixture(scope="module")
def profiled():
    torch.manual_seed(0)
    model = build_model("resnet_fm").eval()
    x = torch.randn(1, 1, 28, 28)
    graph = trace(model, (x,))
    return model, graph, profile_graph(graph, (x,), batches=(1, 16), repeats=5, warmup=2, model_name="resnet_fm")


def test_node_times_add_up_to_about_the_whole_model(profiled):
    model, graph, profile = profiled
    total = profile.segment_seconds(0, len(graph.nodes), batch=16)
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        for _ in range(3):
            model(x)
        runs = []
        for _ in range(5):
            started = time.perf_counter()
            model(x)
            runs.append(time.perf_counter() - started)
    whole = sorted(runs)[2]
    # node-by-node interpretation adds a few microseconds a node; the sum stays near the whole
    assert 0.3 * whole < total < 5.0 * whole, (total, whole)
    assert profile.segment_seconds(0, len(graph.nodes), batch=16) > profile.segment_seconds(0, len(graph.nodes))
    assert all(t >= 0 for t in profile.seconds[1])


def test_profile_json_round_trips_with_host_torch_and_threads(profiled, tmp_path):
    _, graph, profile = profiled
    path = tmp_path / "device.json"
    profile.save(path)
    data = json.loads(path.read_text())
    assert {"host", "torch", "threads", "cpus", "node_names", "seconds", "schema"} <= set(data)
    back = Profile.load(path)
    assert back == profile and back.node_names == [n.name for n in graph.nodes]
    data["schema"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="profile again"):
        Profile.load(path)


def test_under_a_cpu_quota_the_profile_keeps_means_and_records_its_pauses():
    graph_model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU())
    x = torch.randn(1, 32)
    graph = trace(graph_model, (x,))
    started = time.perf_counter()
    profile = profile_graph(graph, (x,), repeats=4, warmup=1, cpu_quota=0.5, pause_s=0.01)
    assert time.perf_counter() - started >= 5 * 0.01  # it idled before every run
    assert (profile.statistic, profile.cpu_quota, profile.pause_s) == ("mean", 0.5, 0.01)
    again = Profile.from_json(profile.to_json())
    assert again == profile


def _profile_json(**changes) -> str:
    data = {"model": "m", "host": "h", "torch": "t", "threads": 1, "cpus": 1, "node_names": ["a", "b", "c"],
            "seconds": {"1": [0.1, 0.2, 0.3]}, "repeats": 1, "cpu_quota": None, "schema": 1}
    data.update(changes)
    return json.dumps(data)


@pytest.mark.parametrize(("text", "needle"), [
    (_profile_json(seconds={"1": [0.1, 0.2]}), "batch 1 has 2 node times for 3 nodes"),
    (_profile_json(seconds={"1": [0.1, 0.2, 0.3], "4": [0.1]}), "batch 4 has 1 node times for 3 nodes"),
    (_profile_json(seconds={"1": [0.1, -0.2, 0.3]}), "not finite numbers >= 0"),
    (_profile_json(seconds={"1": [0.1, float("nan"), 0.3]}), "not finite numbers >= 0"),
    (_profile_json(seconds={"1": [0.1, "x", 0.3]}), "not finite numbers >= 0"),
    (_profile_json(seconds={"0": [0.1, 0.2, 0.3]}), "batch size '0'"),
    (_profile_json(seconds={}), "seconds must map"),
    (_profile_json(cpu_quota=-1), "cpu_quota"),
    (_profile_json(node_names="abc"), "node_names"),
    (_profile_json(surprise=1), "unknown surprise"),
    ("[1]", "a JSON list, not a profile"),
    ("{", "not valid JSON"),
])
def test_malformed_profiles_are_refused_with_a_reason(text, needle):
    with pytest.raises(ValueError, match="^src: ") as err:
        Profile.from_json(text, source="src")
    assert needle in str(err.value)
    assert Profile.from_json(_profile_json(), source="src").seconds == {1: [0.1, 0.2, 0.3]}

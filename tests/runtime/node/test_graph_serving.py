"""Cuts of a traced graph served by a real node: a cut inside an inception block sends
several crossing tensors as several inputs of one Open Inference Protocol request, each with
its own codec, and the answer equals the model's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgesplit.partitioner.cuts import enumerate_cuts, split
from edgesplit.partitioner.graph import trace
from edgesplit.runtime.codec import encode
from edgesplit.runtime.node.registry import ModelRegistry, register_graph_cuts
from edgesplit.runtime.transport.client import EdgeClient, OffloadError
from tests.helpers import start_in_thread, stop_in_thread
from tests.partitioner.test_graph_cuts import InceptionNet


@pytest.fixture(scope="module")
def served():
    torch.manual_seed(0)
    model = InceptionNet().eval()
    x = torch.randn(2, 3, 16, 16)
    graph = trace(model, (x,))
    cuts = enumerate_cuts(graph)
    widest = max(cuts, key=lambda c: len(c.crossing))
    registry = ModelRegistry()
    names = register_graph_cuts(registry, "incept", graph, indices=[0, widest.index])
    running, thread = start_in_thread(registry, workers=1)
    yield model, graph, widest, names, running
    stop_in_thread(running, thread)


def test_a_multi_tensor_cut_travels_as_several_inputs_each_with_its_own_codec(served):
    model, graph, cut, names, running = served
    assert names == ["incept", f"incept.from.{cut.index}"] and len(cut.crossing) >= 3
    x = torch.randn(3, 3, 16, 16)
    head, _ = split(graph, cut.index)
    with torch.no_grad():
        crossing = head(x)
        expected = model(x)
    codecs = ["fp32", "int8-channel", "fp16", "int8"]
    tensors = {name: encode(t, codecs[i % len(codecs)]) for i, (name, t) in enumerate(zip(cut.crossing, crossing))}
    assert len({t.codec for t in tensors.values()}) >= 3
    client = EdgeClient(running.address)
    try:
        result = client.infer(f"incept.from.{cut.index}", tensors, timeout=10)
        assert result.logits.shape == (3, 10)
        assert np.abs(result.logits.numpy() - expected.numpy()).max() < 0.05
        assert result.sent_bytes == sum(len(t.data) for t in tensors.values())
        whole = client.infer("incept", {"x": encode(x)}, timeout=10)
        assert torch.allclose(whole.logits, expected, atol=1e-5)
        missing = dict(list(tensors.items())[1:])
        with pytest.raises(OffloadError) as err:
            client.infer(f"incept.from.{cut.index}", missing, timeout=10)
        assert err.value.reason == "INVALID_ARGUMENT"
    finally:
        client.close()


def test_edge_node_serves_a_bundle_and_refuses_a_tampered_one(tmp_path):
    from edgesplit.models import load_trained
    from edgesplit.partitioner.bundle import WEIGHTS, load_bundle, write_bundle
    from edgesplit.runtime.node.launcher import NodeProcess
    from edgesplit.runtime.node.server import main as node_main

    write_bundle(load_trained("resnet_fm"), tmp_path / "b")
    bundle = load_bundle(tmp_path / "b")
    cut = max((c for c in enumerate_cuts(bundle.graph) if c.transferable), key=lambda c: len(c.crossing))
    x = torch.randn(2, 1, 28, 28)
    head, _ = split(bundle.graph, cut.index)
    with torch.no_grad():
        crossing, expected = head(x), bundle.model(x)
    with NodeProcess(model=None, extra_args=["--bundle", str(tmp_path / "b")]) as node:
        client = EdgeClient(node.address)
        try:
            tensors = {n: encode(t, "fp16") for n, t in zip(cut.crossing, crossing)}
            result = client.infer(f"resnet_fm.graph.from.{cut.index}", tensors, timeout=30)
            assert len(tensors) >= 2 and torch.allclose(result.logits, expected, atol=0.05)
        finally:
            client.close()
    data = bytearray((tmp_path / "b" / WEIGHTS).read_bytes())
    data[100] ^= 0xFF
    (tmp_path / "b" / WEIGHTS).write_bytes(bytes(data))
    assert node_main(["--bundle", str(tmp_path / "b"), "--port", "0", "--metrics-port", "-1"]) == 2


@pytest.mark.parametrize("extra", [["--model", "resnet_fm"], ["--nonn", "nonn_resnet_fm_s4_enhanced"]])
def test_a_bundle_is_served_alone_and_asking_for_more_is_refused(tmp_path, capsys, extra):
    """With --model or --nonn beside --bundle, the node served the bundle only, and its
    start-up line announced the NoNN members it did not serve."""
    from edgesplit.runtime.node.server import main as node_main

    assert node_main(["--bundle", str(tmp_path), "--port", "0", "--metrics-port", "-1", *extra]) == 2
    assert "--bundle serves the bundle's own model" in capsys.readouterr().err


def test_graph_profile_is_measured_on_the_node_and_fetched_over_the_control_service(served):
    from edgesplit.partitioner.profile import Profile
    from edgesplit.runtime.transport.client import fetch_graph_profile

    _, graph, _, _, running = served
    text = fetch_graph_profile(running.address, "incept", repeats=3, timeout=60)
    profile = Profile.from_json(text)
    assert profile.node_names == [n.name for n in graph.nodes]
    assert profile.repeats == 3 and profile.statistic == "median" and profile.cpu_quota is None
    assert all(t > 0 for t in profile.seconds[1])
    assert profile.decode_seconds_per_element > 0  # the node measured its own codec cost too
    # Asked again, the node answers the profile it took instead of measuring anew.
    assert fetch_graph_profile(running.address, "incept", repeats=3, timeout=60) == text


@pytest.mark.parametrize("graph_name,repeats,code,words", [
    ("nope", 3, "NOT_FOUND", "graphs served here: incept"),
    ("incept", 1000, "INVALID_ARGUMENT", "repeats must be within 1..50"),
    ("incept", -1, "INVALID_ARGUMENT", "repeats must be within 1..50"),
])
def test_graph_profile_refuses_unknown_graphs_and_unbounded_work(served, graph_name, repeats, code, words):
    from edgesplit.runtime.transport.client import fetch_graph_profile

    running = served[-1]
    with pytest.raises(OffloadError) as err:
        fetch_graph_profile(running.address, graph_name, repeats=repeats, timeout=30)
    assert err.value.reason == code and words in str(err.value)


def test_a_second_profile_while_one_is_taken_is_refused_not_queued(served):
    from edgesplit.runtime.inference import InferError

    registry = served[-1].plane.registry
    graph = registry.graphs["incept"]
    assert graph._lock.acquire()  # a profile in progress
    try:
        with pytest.raises(InferError) as err:
            graph.profile(repeats=7)
        assert err.value.code == InferError.RESOURCE_EXHAUSTED and err.value.retry_after_s == 1.0
    finally:
        graph._lock.release()
    assert json.loads(graph.profile(repeats=2))["repeats"] == 2  # free again: measured and cached

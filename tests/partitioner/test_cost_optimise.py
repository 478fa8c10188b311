"""Cost model and optimiser: transfer and energy arithmetic, the choice flips between device
and edge as bandwidth and device speed change, and the minimum s-t cut is never worse than
the best enumerated cut (equal on a chain)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from edgesplit.models import build_model
from edgesplit.partitioner.cost import PI4, Link, cut_bytes, predict
from edgesplit.partitioner.cuts import enumerate_cuts
from edgesplit.partitioner.graph import trace
from edgesplit.partitioner.optimise import choose, min_cut_latency, pareto
from edgesplit.partitioner.profile import profile_graph
from tests.partitioner.test_graph_cuts import InceptionNet


def scaled(profile, factor: float):
    return dataclasses.replace(profile, seconds={b: [t * factor for t in v] for b, v in profile.seconds.items()})


@pytest.fixture(scope="module", params=["resnet_fm", "inception"])
def setup(request):
    torch.manual_seed(0)
    if request.param == "resnet_fm":
        model, x = build_model("resnet_fm").eval(), torch.randn(1, 1, 28, 28)
    else:
        model, x = InceptionNet().eval(), torch.randn(1, 3, 16, 16)
    graph = trace(model, (x,))
    edge = profile_graph(graph, (x,), repeats=3, warmup=1)
    return request.param, graph, enumerate_cuts(graph), edge


def test_transfer_energy_and_bytes():
    link = Link(10.0, rtt_s=0.02)
    assert link.transfer_seconds(0) == 0.0
    assert link.transfer_seconds(125_000) == pytest.approx(0.1 + 0.02)
    assert PI4.energy_joules(1.0, 0.0, link) == pytest.approx(3.7)
    wifi_w = 0.28317 * 10 + 0.13286
    assert PI4.energy_joules(0.0, 2.0, link) == pytest.approx(2 * wifi_w)


def test_cut_zero_sends_uint8_pixels_and_the_last_cut_sends_nothing(setup):
    name, graph, cuts, _ = setup
    assert cut_bytes(cuts[0], "fp32", cuts[-1].index) == cuts[0].crossing_bytes // 4
    assert cut_bytes(cuts[-1], "fp32", cuts[-1].index) == 0
    middle = cuts[len(cuts) // 2]
    assert cut_bytes(middle, "fp32", cuts[-1].index) == 4 * cut_bytes(middle, "int8", cuts[-1].index)


def test_the_choice_moves_from_device_to_edge_as_the_device_slows_and_the_link_speeds_up(setup):
    name, graph, cuts, edge = setup
    fast_device, slow_device = scaled(edge, 1.7), scaled(edge, 100.0)
    slow_link, fast_link = Link(0.5, 0.05), Link(1000.0, 0.0005)
    assert choose(predict(cuts, fast_device, edge, slow_link)).cut == cuts[-1].index  # all on the device
    assert choose(predict(cuts, slow_device, edge, fast_link)).cut == 0  # send the image
    front = pareto(predict(cuts, slow_device, edge, Link(5.0)))
    assert front and all(a.total_s <= b.total_s and a.energy_j > b.energy_j for a, b in zip(front, front[1:]))


@pytest.mark.parametrize("factor,mbit", [(1.7, 5.0), (20.0, 5.0), (60.0, 2.0), (300.0, 50.0)])
def test_min_cut_is_never_worse_than_the_best_enumerated_cut(setup, factor, mbit):
    name, graph, cuts, edge = setup
    device, link = scaled(edge, factor), Link(mbit, 0.02)
    best = choose(predict(cuts, device, edge, link, codec="fp32"))
    value, on_device = min_cut_latency(graph, device, edge, link, codec="fp32")
    assert value <= best.total_s + 1e-9
    if name == "resnet_fm" and best.cut in (0, cuts[-1].index):  # a chain at its ends: the same plan
        assert value == pytest.approx(best.total_s)
    # what runs on the device is closed under predecessors
    names = {n.name: n for n in graph.nodes}
    for n in on_device:
        assert all(src in on_device or src in graph.input_names for src in names[n].inputs)

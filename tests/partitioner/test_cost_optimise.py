"""Cost model and optimiser: transfer and energy arithmetic, the choice flips between device
and edge as bandwidth and device speed change, and the minimum s-t cut is never worse than
the best enumerated cut (equal on a chain)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from edgesplit.models import build_model
from edgesplit.partitioner.cost import PI4, Exit, Link, cut_bytes, predict
from edgesplit.partitioner.cuts import block_cuts, enumerate_cuts, split
from edgesplit.partitioner.graph import trace
from edgesplit.partitioner.optimise import choose, min_cut_latency, pareto, undominated_cuts
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
    assert link.transfer_seconds(125_000) == pytest.approx(0.1 * 1514 / 1448 + 0.02)
    assert link.transfer_seconds(125_000, answer_bytes=125_000) == pytest.approx(0.2 * 1514 / 1448 + 0.02)
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


def test_a_token_bucket_lets_its_burst_through_at_line_rate_in_each_direction():
    link = Link(bandwidth_mbit=1.0, rtt_s=0.0, framing=1.0, burst_bytes=3000)
    assert link.transfer_seconds(2000, answer_bytes=2000) == 0.0  # both fit in the buckets
    assert link.transfer_seconds(5000, answer_bytes=4000) == pytest.approx((2000 + 1000) * 8 / 1e6)


def test_the_answer_travels_back_and_the_codec_costs_per_element(setup):
    _, graph, cuts, edge = setup
    link = Link(bandwidth_mbit=1.0, rtt_s=0.0)
    plain = {p.cut: p for p in predict(cuts, edge, edge, link)}
    costly = dataclasses.replace(edge, encode_seconds_per_element=1e-6, decode_seconds_per_element=2e-6)
    charged = {p.cut: p for p in predict(cuts, costly, costly, link)}
    last = cuts[-1].index
    assert plain[last].transfer_s == 0.0 and charged[last].device_s == plain[last].device_s
    answer = 4 * sum(s[1] for s in cuts[-1].crossing_shapes)  # float32 logits, batch 1
    for cut in (c for c in cuts if c.transferable and c.index != last):
        elements = sum(math.prod(s) for s in cut.crossing_shapes)
        sent = cut_bytes(cut, "int8", last)
        assert plain[cut.index].transfer_s == pytest.approx((sent + answer) * link.framing * 8 / 1e6)
        assert charged[cut.index].device_s - plain[cut.index].device_s == pytest.approx(elements * 1e-6)
        assert charged[cut.index].edge_s - plain[cut.index].edge_s == pytest.approx(elements * 2e-6)


def test_undominated_cuts_keep_every_cut_that_can_win_when_the_device_is_slower(setup):
    _, graph, cuts, edge = setup
    last = cuts[-1].index
    kept = undominated_cuts(cuts)
    assert kept[0] == 0 and kept[-1] == last
    sizes = [cut_bytes(cuts[k], "int8", last) for k in kept[:-1]]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    # Under any link and any device slower per node than the edge, the best cut is kept.
    for factor in (1.5, 4.0, 30.0):
        device = scaled(edge, factor)
        for mbit in (0.2, 2.0, 50.0, 1000.0):
            best = choose(predict(cuts, device, edge, Link(mbit, 0.005)))
            best_kept = choose([p for p in predict(cuts, device, edge, Link(mbit, 0.005)) if p.cut in kept])
            assert best_kept.total_s == pytest.approx(best.total_s), (factor, mbit, best.cut, kept)


def test_exits_weight_each_cut_by_the_inputs_that_leave_early():
    torch.manual_seed(0)
    model = build_model("resnet_fm").eval()
    x = torch.randn(1, 1, 28, 28)
    graph = trace(model, (x,))
    cuts = enumerate_cuts(graph)
    profile = profile_graph(graph, (x,), repeats=2, warmup=1)
    device = scaled(profile, 5.0)
    link = Link(2.0, 0.02)
    where = block_cuts(model, graph)
    exit_cut = where[model.exit_cuts[0]]
    plain = {p.cut: p for p in predict(cuts, device, profile, link)}

    def with_rate(rate):
        return {p.cut: p for p in predict(cuts, device, profile, link, exits=[Exit(exit_cut, rate, 0.001)])}

    none, half, every = with_rate(0.0), with_rate(0.5), with_rate(1.0)
    up_to_exit = device.segment_seconds(0, exit_cut) + 0.001
    for cut, p in plain.items():
        if cut < exit_cut:  # the exit is on the edge's side: it changes nothing
            assert half[cut] == p
            continue
        assert none[cut].total_s == pytest.approx(p.total_s + 0.001)  # its head is paid, nobody leaves
        assert every[cut].total_s == pytest.approx(up_to_exit) and every[cut].transfer_s == 0.0
        assert half[cut].total_s == pytest.approx(0.5 * up_to_exit + 0.5 * none[cut].total_s)
    with pytest.raises(ValueError, match="add up to"):
        predict(cuts, device, profile, link, exits=[Exit(exit_cut, 0.7), Exit(cuts[-1].index, 0.6)])


def test_block_cuts_place_every_block_boundary_of_a_split_model_in_its_graph():
    torch.manual_seed(0)
    model = build_model("resnet_fm").eval()
    x = torch.randn(2, 1, 28, 28)
    graph = trace(model, (x[:1],))
    where = block_cuts(model, graph)
    assert sorted(where) == list(range(model.num_blocks + 1))
    assert [where[j] for j in sorted(where)] == sorted(where.values())
    for j, index in where.items():
        if 0 < j < model.num_blocks:
            head, _ = split(graph, index)
            with torch.no_grad():
                (crossing,) = head(x)
                assert torch.allclose(crossing, model.run(x, 0, j), atol=1e-5)

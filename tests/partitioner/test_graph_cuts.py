"""Graph analysis: head then tail equals the full model at every cut of ResNet-18, MobileNetV2,
resnet_fm and an inception-like model (several tensors cross inside its branching block);
MACs agree with the per-block counter; data-dependent control flow is refused by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgesplit.models import build_model
from edgesplit.partitioner.cuts import enumerate_cuts, split
from edgesplit.partitioner.flops import block_macs
from edgesplit.partitioner.graph import GraphError, trace


class Inception(nn.Module):
    """A branching block: four parallel paths, concatenated."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.b1 = nn.Conv2d(cin, 8, 1)
        self.b3 = nn.Sequential(nn.Conv2d(cin, 6, 1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1))
        self.b5 = nn.Sequential(nn.Conv2d(cin, 4, 1), nn.ReLU(), nn.Conv2d(4, 8, 5, padding=2))
        self.pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(cin, 8, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.pool(x)], dim=1)


class InceptionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.mixed = Inception(16)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x):
        return self.head(torch.relu(self.mixed(self.stem(x))))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # depends on the values: no static graph
            return x * 2
        return x


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.fc(x))


def check_every_cut(model: nn.Module, x: torch.Tensor):
    graph = trace(model, (x,))
    cuts = enumerate_cuts(graph)
    with torch.no_grad():
        expected = model.eval()(x)
        for cut in cuts:
            assert cut.transferable, cut
            head, tail = split(graph, cut.index)
            crossing = head(x)
            assert [tuple(t.shape) for t in crossing] == list(cut.crossing_shapes)
            assert torch.allclose(tail(*crossing), expected, atol=1e-5), f"cut {cut.index} after {cut.after}"
        if graph.tracer == "export":  # the batch stays dynamic: another batch size splits as well
            other = torch.cat([x, x, x])
            head, tail = split(graph, len(cuts) // 2)
            assert torch.allclose(tail(*head(other)), model(other), atol=1e-5)
    return graph, cuts


@pytest.mark.parametrize("name,shape", [("resnet_fm", (2, 1, 28, 28)), ("resnet18", (1, 3, 64, 64)),
                                        ("mobilenet_v2", (1, 3, 64, 64))])
def test_head_then_tail_equals_the_model_at_every_cut_of_the_zoo(name, shape):
    torch.manual_seed(0)
    model = build_model(name).eval()
    graph, cuts = check_every_cut(model, torch.randn(*shape))
    assert cuts[0].crossing_shapes == (shape,) and cuts[-1].crossing_shapes[0][-1] in (10, 1000)
    assert max(len(c.crossing) for c in cuts) >= 2, "residual blocks have cuts with two crossing tensors"
    per_sample = graph.total_macs // shape[0]
    if name == "resnet_fm":  # same input size as the per-block counter uses
        assert per_sample == sum(block_macs(model))


def test_an_inception_block_has_cuts_with_several_crossing_tensors():
    torch.manual_seed(0)
    graph, cuts = check_every_cut(InceptionNet(), torch.randn(2, 3, 16, 16))
    assert max(len(c.crossing) for c in cuts) >= 3
    widest = max(cuts, key=lambda c: len(c.crossing))
    assert widest.crossing_bytes == sum(4 * torch.Size(s).numel() for s in widest.crossing_shapes)
    assert [c.head_macs for c in cuts] == sorted(c.head_macs for c in cuts)
    assert cuts[-1].head_macs == graph.total_macs


def test_data_dependent_control_flow_is_refused_with_the_module_name():
    with pytest.raises(GraphError, match=r"gate \(Gate\)") as err:
        trace(Gated(), (torch.randn(1, 4),))
    assert "torch.where" in str(err.value)


def test_a_cut_out_of_range_is_refused():
    graph = trace(nn.Linear(2, 2), (torch.zeros(1, 2),))
    with pytest.raises(ValueError, match=f"cut must be in 0..{len(graph.nodes)}"):
        split(graph, len(graph.nodes) + 1)

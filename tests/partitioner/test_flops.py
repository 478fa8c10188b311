"""MAC counts against values computed by hand and against published figures."""

from __future__ import annotations

import pytest
from torch import nn

from edgesplit.models import build_model
from edgesplit.models.split_model import SplitModel
from edgesplit.partitioner.flops import block_macs, exit_macs, mac_summary


def test_small_model_counts_match_the_hand_computation():
    model = SplitModel(
        "hand",
        [("conv", nn.Conv2d(1, 4, 3, padding=1)), ("grouped", nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)),
         ("flat", nn.Flatten()), ("fc", nn.Linear(8 * 4 * 4, 10))],
        {2: nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 3))}, (1, 8, 8), 10,
    )
    # conv: 4 output channels x 8x8 positions x (1 input channel x 3x3) = 2304
    # grouped: 8 x 4x4 positions x (4/2 channels x 3x3) = 2304; linear: 128 x 10 = 1280
    assert block_macs(model) == [2304, 2304, 0, 1280]
    assert exit_macs(model) == {2: 128 * 3}
    assert mac_summary(model) == {"blocks": [2304, 2304, 0, 1280], "exits": {"2": 384}}


@pytest.mark.parametrize("name,published", [("resnet18", 1.814e9), ("mobilenet_v2", 300.8e6)])
def test_imagenet_models_match_their_published_mac_counts(name, published):
    # torchvision's model cards: ResNet-18 1.814 GFLOPS (multiply-accumulates), MobileNetV2 0.30 G
    total = sum(block_macs(build_model(name)))
    assert total == pytest.approx(published, rel=0.005)


def test_resnet_fm_total_is_the_documented_31_million():
    assert sum(block_macs(build_model("resnet_fm"))) == 31_021_952

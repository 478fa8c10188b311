"""The device class emulated by time: the same answers, each block taking 1/quota as long."""

import time

import pytest
import torch

from edgesplit.models import build_model
from edgesplit.runtime.device.slowed import slowed


def test_a_slowed_model_gives_the_same_outputs_and_takes_longer():
    torch.manual_seed(0)
    model = build_model("resnet_fm").eval()
    slow = slowed(model, quota=0.1)
    x = torch.randn(2, *model.input_shape)
    with torch.inference_mode():
        model(x)  # warm up
        started = time.perf_counter()
        fast_out = model(x)
        fast_s = time.perf_counter() - started
        started = time.perf_counter()
        slow_out = slow(x)
        slow_s = time.perf_counter() - started
        assert torch.equal(slow.exit_logits(4, model.run(x, 0, 4)), model.exit_logits(4, model.run(x, 0, 4)))
    assert torch.equal(fast_out, slow_out)
    # sleeping makes it at least (1/quota - 1) times the real compute longer; the bound is loose
    assert slow_s >= 3 * fast_s
    assert [c.shape for c in slow.cut_points()] == [c.shape for c in model.cut_points()]


def test_quota_must_be_a_fraction_of_a_core():
    with pytest.raises(ValueError, match="fraction"):
        slowed(build_model("resnet_fm"), quota=0)

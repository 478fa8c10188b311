"""Split models: head then tail equals the full model at every cut; cut points and exits."""

import pytest
import torch

from edgesplit.models import MODELS, build_model


def test_head_then_tail_equals_full_model_at_every_cut(trained_model):
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    with torch.inference_mode():
        full = trained_model(x)
        for cut in range(trained_model.num_blocks + 1):
            head = trained_model.run(x, 0, cut)
            tail = trained_model.run(head, cut)
            assert (tail - full).abs().max().item() <= 1e-5, f"cut {cut}"


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_imagenet_models_split_exactly(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        full = model(x)
        assert full.shape == (1, 1000)
        for cut in (1, model.num_blocks // 2, model.num_blocks - 1):
            tail = model.run(model.run(x, 0, cut), cut)
            assert (tail - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cut_points_trace_crossing_shapes(name):
    model = build_model(name)
    cuts = model.cut_points()
    assert len(cuts) == model.num_blocks + 1
    assert cuts[0].shape == model.input_shape
    assert cuts[-1].shape == (model.num_classes,)
    assert len(model.exit_cuts) >= 2
    with torch.inference_mode():
        for cut in model.exit_cuts:
            logits = model.exit_logits(cut, torch.zeros(1, *cuts[cut].shape))
            assert logits.shape == (1, model.num_classes)


def test_resnet_fm_has_the_documented_layout():
    model = build_model("resnet_fm")
    assert model.exit_cuts == [4, 7]
    assert [c.shape for c in model.cut_points()][4] == (16, 28, 28)
    assert len(model.forward_exits(torch.zeros(2, 1, 28, 28))) == 3


def test_bad_cuts_say_what_is_allowed():
    model = build_model("resnet_fm")
    with pytest.raises(ValueError, match="0..11"):
        model.run(torch.zeros(1, 1, 28, 28), 0, 12)
    with pytest.raises(ValueError, match="before"):
        model.run(torch.zeros(1, 1, 28, 28), 5, 3)
    with pytest.raises(KeyError, match="exits are at"):
        model.exit_logits(5, torch.zeros(1, 32, 14, 14))
    with pytest.raises(KeyError, match="zoo has"):
        build_model("vgg")

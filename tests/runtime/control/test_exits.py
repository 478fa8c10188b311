"""Exit calibration: rates and accuracy per threshold, measured on labelled data with the
shipped model; a lower threshold lets more inputs leave early."""

from pathlib import Path

import pytest
import torch

from edgesplit.models import load_trained
from edgesplit.models.datasets import load_images, to_tensor
from edgesplit.models.split_model import confidence
from edgesplit.runtime.control.exits import calibrate_exits


def test_rates_and_accuracy_match_a_direct_count_on_the_shipped_model():
    model = load_trained("resnet_fm")
    images, labels = load_images("sample")
    x, y = to_tensor(images[:200]), [int(v) for v in labels[:200]]
    table = calibrate_exits(model, x, y, thresholds=(0.5, 0.9), batch=64)
    assert [s.name for s in table] == ["no exits", "exits at 0.5", "exits at 0.9"]
    with torch.inference_mode():
        outs = model.forward_exits(x)
    final = confidence(outs[-1])[1]
    assert table[0].accuracy == pytest.approx(sum(int(p) == t for p, t in zip(final, y)) / 200)
    first_cut = model.exit_cuts[0]
    c, _ = confidence(outs[0])
    assert table[2].rates[first_cut] == pytest.approx(float((c >= 0.9).float().mean()))
    assert table[2].thresholds == {cut: 0.9 for cut in model.exit_cuts}
    # a lower threshold: at least as many leave at the first exit, and never more than all
    assert table[1].rates[first_cut] >= table[2].rates[first_cut]
    assert all(sum(s.rates.values()) <= 1.0 + 1e-6 for s in table)


def test_labels_must_match_inputs():
    model = load_trained("resnet_fm")
    with pytest.raises(ValueError, match="as many labels"):
        calibrate_exits(model, torch.zeros(3, 1, 28, 28), [1, 2])


def _manifest(**entry_changes):
    entry = {"max_drop_points": 0.5, "thresholds": {"4": 0.8, "7": 0.9}, "exit_rates": {"4": 0.3, "7": 0.2},
             "accuracy": 0.92}
    entry.update(entry_changes)
    return {"exit_cuts": [4, 7], "exits": {"confidence": "entropy", "final_accuracy": 0.93, "settings": [entry]}}


def test_settings_from_a_bundle_carry_the_confidence_their_thresholds_were_calibrated_on():
    from edgesplit.partitioner.bundle import load_bundle
    from edgesplit.runtime.control.exits import settings_from_manifest

    bundle = load_bundle(Path(__file__).resolve().parents[3] / "partitioner/compress/weights/resnet_fm_exits")
    settings = settings_from_manifest(bundle.manifest)
    assert {s.confidence for s in settings} == {bundle.manifest["exits"]["confidence"]} == {"entropy"}
    assert all(0 <= s.accuracy <= 1 and sum(s.rates.values()) <= 1 for s in settings)
    parsed = settings_from_manifest(_manifest())
    assert parsed[1].thresholds == {4: 0.8, 7: 0.9} and parsed[1].rates == {4: 0.3, 7: 0.2}
    assert parsed[1].name == "calibrated, at most 0.5 points" and parsed[0].accuracy == 0.93


@pytest.mark.parametrize("change, message", [
    ({"thresholds": {"4": float("nan")}}, "finite threshold"),
    ({"thresholds": {"4": -5}}, "finite threshold"),
    ({"thresholds": {"9": 0.8}, "exit_rates": {}}, "cut 9 holds no exit"),
    ({"thresholds": {"2.5": 0.8}}, "not a cut index"),
    ({"exit_rates": {"4": 2.0, "7": 1.0}}, "from 0 to 1"),
    ({"exit_rates": {"4": 0.7, "7": 0.6}}, "sum to 1.3"),
    ({"exit_rates": {"4": float("nan")}}, "from 0 to 1"),
    ({"thresholds": {"4": 0.8}}, "no threshold"),
    ({"accuracy": 7.5}, "from 0 to 1"),
    ({"accuracy": None}, "from 0 to 1"),
    ({"thresholds": [0.8]}, "must be an object"),
    ({"exit_rates": None}, "must be an object"),
])
def test_malformed_exit_tables_are_refused_naming_the_field(change, message):
    from edgesplit.runtime.control.exits import settings_from_manifest

    with pytest.raises(ValueError, match=message):
        settings_from_manifest(_manifest(**change))


@pytest.mark.parametrize("manifest, message", [
    ({"exits": []}, "must be an object"),
    ({"exits": {"settings": {}}}, "must be a list"),
    ({"exits": {"settings": ["x"]}}, r"settings\[0\] must be an object"),
    ({"exits": {"confidence": "margin"}}, "confidence must be one of"),
    ({"exits": {"final_accuracy": float("inf")}}, "final_accuracy"),
])
def test_malformed_exit_sections_are_refused(manifest, message):
    from edgesplit.runtime.control.exits import settings_from_manifest

    with pytest.raises(ValueError, match=message):
        settings_from_manifest(manifest)


def test_an_embedded_controller_refuses_thresholds_calibrated_on_another_confidence():
    from edgesplit.runtime.control.controller import EmbeddedController
    from edgesplit.runtime.control.exits import settings_from_manifest
    from edgesplit.runtime.control.policy import LeastLatency, PlanSpace
    from edgesplit.runtime.device.runner import DeviceRunner

    model = load_trained("resnet_fm")
    space = PlanSpace.for_model(model, repeats=1, exit_settings=settings_from_manifest(_manifest()))
    with pytest.raises(ValueError, match="calibrated on entropy confidence, the runner measures max_softmax"):
        EmbeddedController(DeviceRunner(model, cut=model.num_blocks), space, LeastLatency())
    runner = DeviceRunner(model, cut=model.num_blocks, confidence_kind="entropy")
    EmbeddedController(runner, space, LeastLatency())  # the kinds agree

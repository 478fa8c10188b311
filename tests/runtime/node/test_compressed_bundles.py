"""The committed compressed bundles on a real node: ``edge-node --bundle`` serves the pruned
model (its architecture rebuilt from the manifest) and the model with calibrated exits; the
device runner offloads to it, and every answer matches the same bundle run in-process."""

from __future__ import annotations

import pytest
import torch

from edgesplit.models.datasets import load_sample, to_tensor
from edgesplit.models.split_model import confidence as confidences
from edgesplit.partitioner.bundle import load_bundle
from edgesplit.partitioner.compress import WEIGHTS_DIR
from edgesplit.runtime.device.runner import WHERE_DEVICE, WHERE_EDGE, DeviceRunner
from edgesplit.runtime.node.launcher import NodeProcess
from edgesplit.runtime.transport.client import EdgeClient


@pytest.fixture(scope="module")
def images():
    return to_tensor(load_sample()[0][:24])


def test_pruned_bundle_served_by_edge_node_matches_in_process(images):
    bundle = load_bundle(WEIGHTS_DIR / "resnet_fm_pruned")
    model = bundle.model
    assert sum(p.numel() for p in model.parameters()) < 0.1 * 296398
    with NodeProcess(model=None, extra_args=["--bundle", str(bundle.path)]) as node:
        client = EdgeClient(node.address)
        try:
            for cut in (4, 7):
                runner = DeviceRunner(model, cut=cut, thresholds=1.01, client=client, codec="fp32", deadline_s=10)
                for i in range(len(images)):
                    answer = runner.infer(images[i])
                    assert answer.where == WHERE_EDGE and answer.offload_error is None
                    with torch.inference_mode():
                        expected = model(images[i : i + 1])
                    assert torch.allclose(answer.logits, expected, atol=1e-4), (cut, i)
            # a device still running the unpruned model sends 16 channels where the pruned tail
            # takes fewer: a clear refusal, and the node keeps serving
            from edgesplit.runtime.codec import encode
            from edgesplit.runtime.transport.client import OffloadError

            wide = torch.zeros(1, 16, 28, 28)
            with pytest.raises(OffloadError) as refused:
                client.infer("resnet_fm_pruned.from.4", encode(wide, "fp32"), timeout=10)
            assert refused.value.reason == "INVALID_ARGUMENT" and "shape" in refused.value.message.lower()
            assert DeviceRunner(model, cut=4, thresholds=1.01, client=client, deadline_s=10).infer(
                images[0]).where == WHERE_EDGE
            # its start-up line names the bundle's model (it said "serving resnet_fm" for any bundle)
            assert f"serving resnet_fm_pruned (bundle {bundle.path})" in node.log_path.read_text()
        finally:
            client.close()


def test_exits_bundle_answers_on_the_device_or_the_edge_as_calibrated(images):
    bundle = load_bundle(WEIGHTS_DIR / "resnet_fm_exits")
    model, info = bundle.model, bundle.manifest["exits"]
    assert info["confidence"] in ("max_softmax", "entropy")
    thresholds = {int(c): float(t) for c, t in info["thresholds"].items()}
    cut = max(model.exit_cuts) + 1
    runner_thresholds = {c: thresholds.get(c, 1.01) for c in model.exit_cuts}
    with NodeProcess(model=None, extra_args=["--bundle", str(bundle.path)]) as node:
        client = EdgeClient(node.address)
        try:
            runner = DeviceRunner(model, cut=cut, thresholds=runner_thresholds, client=client, deadline_s=10,
                                  confidence_kind=info["confidence"])
            where = set()
            for i in range(len(images)):
                answer = runner.infer(images[i])
                where.add(answer.where)
                with torch.inference_mode():
                    outs = model.forward_exits(images[i : i + 1])
                if answer.where == WHERE_DEVICE:
                    k = model.exit_cuts.index(int(answer.exit.split("@")[1]))
                    assert torch.allclose(answer.logits, outs[k], atol=1e-5)
                else:
                    assert answer.where == WHERE_EDGE and torch.allclose(answer.logits, outs[-1], atol=1e-4)
            assert WHERE_DEVICE in where  # the calibrated exits do take inputs on the device
        finally:
            client.close()
    assert confidences(torch.zeros(1, 10), "max_softmax")[0].item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="confidence_kind"):
        DeviceRunner(model, cut=cut, confidence_kind="margin")


@pytest.mark.parametrize("name, sections", [("resnet_fm_int8", "int8"), ("resnet_fm_bottleneck", "bottleneck"),
                                            ("resnet_fm_pruned", None)])
def test_a_node_says_when_it_serves_a_bundle_without_its_int8_segment_or_bottleneck(name, sections, caplog):
    """It served the float model of these bundles with only 'serving resnet_fm' in its log."""
    from edgesplit.runtime.node.server import load_registry
    from edgesplit.runtime.node.settings import NodeSettings

    with caplog.at_level("WARNING", logger="edgesplit.node"):
        registry, _ = load_registry(NodeSettings(bundle=str(WEIGHTS_DIR / name)))
    warned = [r.getMessage() for r in caplog.records if "does not serve yet" in r.getMessage()]
    if sections:
        assert len(warned) == 1 and f"carries {sections}" in warned[0] and "float32" in warned[0]
    else:
        assert not warned
    assert registry.names()

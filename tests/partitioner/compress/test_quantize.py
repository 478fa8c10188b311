"""Int8 post-training quantization behind our interface: accuracy, size, exact reload."""

from __future__ import annotations

import warnings

import pytest
import torch

from edgesplit.partitioner.compress.data import accuracy
from edgesplit.partitioner.compress.quantize import (
    Int8Backend,
    float_segment_bytes,
    load_segment,
    quantize_segment,
)


def test_int8_segment_keeps_accuracy_shrinks_weights_and_reloads_exactly(trained_model, tiny_splits, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = quantize_segment(trained_model, 0, trained_model.num_blocks, tiny_splits.x[:300])
        out = q(tiny_splits.test_x[:8])
    assert not [w for w in caught if "torch.ao" in str(w.message) or "deprecated" in str(w.message).lower()]
    assert out.dtype == torch.float32 and out.shape == (8, 10)
    fp32 = accuracy(trained_model, tiny_splits.test_x, tiny_splits.test_y)
    int8 = accuracy(q, tiny_splits.test_x, tiny_splits.test_y)
    assert abs(fp32 - int8) <= 0.02
    size = q.save(tmp_path / "q.safetensors")
    assert float_segment_bytes(trained_model, 0, trained_model.num_blocks, tmp_path / "f.safetensors") / size > 3.5
    reloaded = load_segment(trained_model, tmp_path / "q.safetensors")
    assert torch.equal(reloaded(tiny_splits.test_x[:50]), q(tiny_splits.test_x[:50]))


def test_a_head_segment_quantizes_what_crosses_its_cut(trained_model, tiny_splits, tmp_path):
    x = trained_model.run(tiny_splits.x[:200], 0, 4)
    q = quantize_segment(trained_model, 4, 7, x)
    expected = trained_model.run(x[:20], 4, 7)
    got = q(x[:20])
    assert got.shape == expected.shape
    assert (got - expected).abs().mean() < 0.05 * expected.abs().mean() + 1e-3
    q.save(tmp_path / "s.safetensors")
    assert load_segment(trained_model, tmp_path / "s.safetensors").start == 4


def test_bad_requests_are_refused(trained_model, tmp_path):
    with pytest.raises(ValueError, match="engine"):
        Int8Backend("tpu")
    with pytest.raises(ValueError, match="stop > start"):
        quantize_segment(trained_model, 4, 4, torch.zeros(1, 16, 28, 28))
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ValueError, match="not a"):
        load_segment(trained_model, tmp_path / "junk.safetensors")


def _metadata_edit(key: str, value: str):
    """An edit rewriting one metadata entry of the bundle's int8 segment."""
    def edit(manifest, folder):
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        path = folder / manifest["int8"]["file"]
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata())
        tensors = load_file(str(path))
        if key == "nan-scale":
            name = next(k for k in tensors if k.endswith("#scales"))
            tensors[name] = torch.full_like(tensors[name], float("nan"))
        else:
            meta[key] = value
        save_file(tensors, str(path), metadata=meta)
    return edit


@pytest.mark.parametrize("edit, message", [
    (lambda m, f: m.update(int8=["x"]), "int8 section must be an object"),
    (_metadata_edit("engine", "qnnpack"), "quantized for the qnnpack engine, the manifest says 'x86'"),
    (_metadata_edit("layout", "[1, 2, 3]"), "is not a quantized segment"),
    (_metadata_edit("layout", '{"a": 1}'), "is not a quantized segment"),
    (_metadata_edit("nan-scale", ""), "scales must be finite and positive"),
])
def test_a_tampered_int8_segment_is_a_clean_error(tampered_bundle, edit, message):
    """Each of these loaded silently (another engine's kernels, NaN scales answering NaN) or
    raised AttributeError from deep inside the loader."""
    from edgesplit.partitioner.bundle import load_bundle
    from edgesplit.partitioner.compress.quantize import int8_bundle_segment

    bundle = load_bundle(tampered_bundle("resnet_fm_int8", edit))
    with pytest.raises(ValueError, match=message):
        int8_bundle_segment(bundle)

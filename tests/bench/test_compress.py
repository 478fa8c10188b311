"""Compression benchmark: each part measures the committed bundles and returns the JSON keys
the issue names (a contract other tools read); goals, table and plots follow from them."""

from __future__ import annotations

import json

import pytest

from edgesplit.bench import compress
from edgesplit.partitioner.compress.data import accuracy, load_splits
from edgesplit.runtime.rate import codec_curve

CONTRACT = {
    "pruning": {"params_before", "params_after", "removed_fraction", "acc_before", "acc_after"},
    "int8": {"size_ratio", "acc_drop_points", "latency_ratio_b1", "latency_ratio_b32"},
    "bottleneck": {"cut", "bytes_fp32", "bytes_sent", "image_bytes", "acc_drop_points"},
    "exits": {"mac_ratio", "acc_drop_points", "thresholds"},
}


@pytest.fixture(scope="module")
def result(trained_model):
    data = load_splits(validation=100, train_limit=200, test_limit=300)
    x, y = data.test_x, data.test_y
    reference = accuracy(trained_model, x, y)
    r = {"machine": {}, "test_images": len(y), "reference_accuracy": reference,
         "pruning": compress.pruning(x, y, reference, trained_model, data, 60),
         "int8": compress.int8(x, y, reference, trained_model, quick=True),
         "bottleneck": compress.bottleneck(x, y, reference, trained_model),
         "exits": compress.exits(x, y, reference),
         "rate_curve": codec_curve(trained_model, x[:40], y[:40], cuts=[0, 7]), "rate_curve_images": 40,
         "bottleneck_on_curve": []}
    r["goals"] = compress.goals(r)
    return r


def test_every_contract_key_is_there_and_json_serialisable(result):
    for section, keys in CONTRACT.items():
        assert keys <= set(result[section]), (section, keys - set(result[section]))
    json.dumps(result)
    p, q, b, e = result["pruning"], result["int8"], result["bottleneck"], result["exits"]
    assert p["removed_fraction"] == pytest.approx(1 - p["params_after"] / p["params_before"], abs=1e-4)
    assert p["params_before"] == 296398 and p["removed_fraction"] >= 0.9
    assert p["train_images"] == 60 and 0.5 < p["train_accuracy"] <= 1 and 0.5 < p["val_accuracy"] <= 1
    assert q["size_ratio"] > 3.5 and q["latency_ratio_b1"] > 0 and q["latency_ratio_b32"] > 0
    assert b["image_bytes"] == 784 and b["bytes_sent"] < b["bytes_fp32"]
    assert b["bytes_fp32"] == 4 * 32 * 14 * 14 if b["cut"] == 7 else b["bytes_fp32"] > 0
    assert e["mac_ratio"] > 1 and e["thresholds"]
    assert set(result["goals"]) == set(CONTRACT)


def test_render_and_plots(result, tmp_path):
    table = compress.render(result)
    assert "pruning + distillation" in table and "bottleneck+int8" in table and "cut  7" in table
    assert "60 of its training images" in table
    compress.plot(result, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").stat().st_size > 0 and (tmp_path / "c_size.png").stat().st_size > 0

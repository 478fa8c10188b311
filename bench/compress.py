"""Compression benchmark: the committed compressed bundles evaluated and measured here.

No training (``edgesplit compress partitioner/compress/configs/resnet_fm.toml`` makes the
bundles). Against the shipped, uncompressed ``resnet_fm`` (its final exit), on the
Fashion-MNIST test set (the first 2,000 images with ``--quick``):

- pruning: parameters before and after, the fraction removed, accuracy before and after;
  and the student's accuracy on the training images it was distilled on and on the
  validation split (``train_accuracy``, ``val_accuracy``; ``--quick``: the first 5,000
  training images), which tells a student short of capacity (the two about equal) from
  one that overfits;
- int8: the int8 segment's weights against the same segment's float32 weights (safetensors
  bytes), the accuracy drop, and the median CPU latency of int8 over float32 at batch 1
  and 32 (below 1: int8 is faster), with the torch thread count recorded;
- bottleneck: at the bundle's cut, bytes per request of the bottleneck+int8 code (payload
  plus the int8 scale and zero point) against the float32 crossing tensor and the 784-byte
  uint8 image (the alternative: send the image), and the accuracy drop;
- exits: the calibrated thresholds run as a cascade: final-exit MACs over the mean device
  MACs per sample, and the accuracy drop;
- the rate–accuracy curve: every codec (fp32, fp16, int8, int8-channel, each with and
  without zlib) at every cut, each request encoded on its own, plus the bottleneck.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from edgesplit.bench import machine_info, table

QUICK_IMAGES = 2000
GOALS = {"removed_fraction": 0.90, "pruning_drop": 1.0, "int8_size_ratio": 3.5, "int8_drop": 0.5,
         "bottleneck_bytes": 392, "bottleneck_drop": 1.0, "exits_mac_ratio": 2.0, "exits_drop": 0.5}


def _bundles_dir() -> Path:
    from edgesplit.partitioner.compress import WEIGHTS_DIR

    return WEIGHTS_DIR


def pruning(x, y, reference: float, shipped, fit=None, fit_limit: int | None = None) -> dict:
    """The pruned bundle against the shipped model; with ``fit`` (the splits) also the
    student's training and validation accuracy."""
    from edgesplit.partitioner.bundle import load_bundle
    from edgesplit.partitioner.compress.data import accuracy
    from edgesplit.partitioner.compress.prune import count_params
    from edgesplit.partitioner.flops import block_macs

    bundle = load_bundle(_bundles_dir() / "resnet_fm_pruned")
    model = bundle.model
    after = accuracy(model, x, y)
    card = bundle.manifest.get("compression", {}).get("pruning", {})
    return {"params_before": count_params(shipped), "params_after": count_params(model),
            "removed_fraction": round(1 - count_params(model) / count_params(shipped), 4),
            "acc_before": reference, "acc_after": after, "acc_drop_points": round(100 * (reference - after), 2),
            "macs_before": sum(block_macs(shipped)), "macs_after": sum(block_macs(model)),
            "train_seconds": card.get("train_seconds"),
            **({"train_accuracy": accuracy(model, fit.x[:fit_limit], fit.y[:fit_limit]),
                "train_images": len(fit.y[:fit_limit]),
                "val_accuracy": accuracy(model, fit.val_x, fit.val_y)} if fit is not None else {})}


def int8(x, y, reference: float, shipped, quick: bool) -> dict:
    from edgesplit.partitioner.bundle import load_bundle
    from edgesplit.partitioner.compress.data import accuracy
    from edgesplit.partitioner.compress.quantize import float_segment_bytes, int8_bundle_segment, latency_ms

    bundle = load_bundle(_bundles_dir() / "resnet_fm_int8")
    q = int8_bundle_segment(bundle)
    int8_bytes = (bundle.path / bundle.manifest["int8"]["file"]).stat().st_size
    with tempfile.TemporaryDirectory() as tmp:
        fp32_bytes = float_segment_bytes(shipped, q.start, q.stop, Path(tmp) / "fp32.safetensors")
    after = accuracy(q, x, y)
    latency = {}
    repeats = 20 if quick else 100
    for b in (1, 32):
        xb = x[:b].contiguous()
        latency[b] = {"fp32_ms": latency_ms(shipped, xb, repeats), "int8_ms": latency_ms(q, xb, repeats)}
    return {"size_ratio": round(fp32_bytes / int8_bytes, 3), "fp32_bytes": fp32_bytes, "int8_bytes": int8_bytes,
            "acc_before": reference, "acc_after": after, "acc_drop_points": round(100 * (reference - after), 2),
            "latency_ratio_b1": round(latency[1]["int8_ms"] / latency[1]["fp32_ms"], 3),
            "latency_ratio_b32": round(latency[32]["int8_ms"] / latency[32]["fp32_ms"], 3),
            "latency_ms": {str(b): {k: round(v, 3) for k, v in d.items()} for b, d in latency.items()},
            "engine": q.backend.engine, "torch_threads": torch.get_num_threads()}


def bottleneck(x, y, reference: float, shipped) -> dict:
    from edgesplit.models.datasets import IMAGE_BYTES
    from edgesplit.partitioner.bundle import load_bundle
    from edgesplit.partitioner.compress.bottleneck import bottleneck_from_bundle
    from edgesplit.runtime.rate import codec_point

    bundle = load_bundle(_bundles_dir() / "resnet_fm_bottleneck")
    net = bottleneck_from_bundle(bundle)
    point = codec_point(net.head, net.tail, x, y, "int8", zlib_sample=len(y))
    cut = net.cut
    import zlib

    from edgesplit.models.datasets import MEAN, STD

    images = (x * STD + MEAN).mul(255).round().clamp(0, 255).to(torch.uint8)
    image_zlib = sum(len(zlib.compress(im.numpy().tobytes())) for im in images) / len(images)
    return {"cut": cut, "channels": net.bottleneck.channels, "stride": net.bottleneck.stride,
            "bytes_fp32": shipped.cut_points()[cut].numel * 4, "bytes_sent": point["bytes"],
            "bytes_sent_zlib": point["bytes_zlib"], "image_bytes": IMAGE_BYTES,
            "image_bytes_zlib": round(image_zlib, 1), "acc_before": reference, "acc_after": point["accuracy"],
            "acc_drop_points": round(100 * (reference - point["accuracy"]), 2)}


def exits(x, y, reference: float) -> dict:
    from edgesplit.partitioner.bundle import load_bundle
    from edgesplit.partitioner.compress.exits import exit_costs, outputs_of, simulate, stacked

    bundle = load_bundle(_bundles_dir() / "resnet_fm_exits")
    info = bundle.manifest["exits"]
    model = bundle.model
    thresholds = {int(c): float(t) for c, t in info["thresholds"].items()}
    costs = exit_costs(model)
    conf, pred = stacked(outputs_of(model, x), info["confidence"])
    cascade = simulate(conf, pred, y, model.exit_cuts, thresholds, costs)
    return {"mac_ratio": round(costs[2] / cascade.mean_macs, 3), "acc_before": reference,
            "acc_after": cascade.accuracy, "acc_drop_points": round(100 * (reference - cascade.accuracy), 2),
            "thresholds": info["thresholds"], "confidence": info["confidence"],
            "final_macs": costs[2], "mean_device_macs": round(cascade.mean_macs),
            "exit_rates": {str(c): round(r, 4) for c, r in cascade.exit_rates.items()},
            "exit_cuts": model.exit_cuts, "exit_head": bundle.manifest.get("exit_head", "conv"),
            "exit_head_macs": {str(c): m for c, m in costs[1].items()}}


def run(quick: bool = False, progress: bool = True) -> dict:
    from edgesplit.models import load_trained
    from edgesplit.partitioner.compress.data import accuracy, load_splits
    from edgesplit.runtime.rate import codec_curve

    data = load_splits(test_limit=QUICK_IMAGES if quick else None)
    x, y = data.test_x, data.test_y
    shipped = load_trained("resnet_fm")
    reference = accuracy(shipped, x, y)
    result = {"machine": machine_info(), "test_images": len(y), "reference_accuracy": reference,
              "pruning": pruning(x, y, reference, shipped, data, 5000 if quick else None),
              "int8": int8(x, y, reference, shipped, quick),
              "bottleneck": bottleneck(x, y, reference, shipped), "exits": exits(x, y, reference)}
    curve_images = 1000 if quick else 2000  # the compress run's rate.json has all 10,000
    result["rate_curve"] = codec_curve(shipped, x[:curve_images], y[:curve_images], progress=progress)
    result["rate_curve_images"] = curve_images
    ref = accuracy(shipped, x[:curve_images], y[:curve_images])
    result["rate_curve_reference"] = ref
    # the committed bottleneck on the curve's own images, so the picture compares like with like
    on_curve = bottleneck(x[:curve_images], y[:curve_images], ref, shipped)
    result["bottleneck_on_curve"] = [{"cut": on_curve["cut"], "channels": on_curve["channels"],
                                      "bytes": on_curve["bytes_sent"], "bytes_zlib": on_curve["bytes_sent_zlib"],
                                      "test_accuracy": on_curve["acc_after"]}]
    result["goals"] = goals(result)
    return result


def goals(r: dict) -> dict:
    p, q, b, e = r["pruning"], r["int8"], r["bottleneck"], r["exits"]
    return {
        "pruning": p["removed_fraction"] >= GOALS["removed_fraction"] and p["acc_drop_points"] <= GOALS["pruning_drop"],
        "int8": q["size_ratio"] >= GOALS["int8_size_ratio"] and q["acc_drop_points"] <= GOALS["int8_drop"],
        "bottleneck": b["bytes_sent"] <= GOALS["bottleneck_bytes"] and b["acc_drop_points"] <= GOALS["bottleneck_drop"],
        "exits": e["mac_ratio"] >= GOALS["exits_mac_ratio"] and e["acc_drop_points"] <= GOALS["exits_drop"],
    }


def _yes(ok: bool) -> str:
    return "met" if ok else "NOT met"


def render(r: dict) -> str:
    p, q, b, e, g = r["pruning"], r["int8"], r["bottleneck"], r["exits"], r["goals"]
    rows = [
        ["pruning + distillation", f"{p['params_before']:,} -> {p['params_after']:,} params "
         f"({100 * p['removed_fraction']:.1f}% removed); MACs {p['macs_before']:,} -> {p['macs_after']:,}",
         f"{100 * p['acc_after']:.2f}", f"{p['acc_drop_points']:+.2f}", ">= 90% removed, <= 1.0", _yes(g["pruning"])],
        ["int8 (x86, whole chain)", f"weights {q['size_ratio']:.2f}x smaller; latency int8/fp32 "
         f"{q['latency_ratio_b1']:.2f} (b1), {q['latency_ratio_b32']:.2f} (b32)",
         f"{100 * q['acc_after']:.2f}", f"{q['acc_drop_points']:+.2f}", ">= 3.5x, <= 0.5", _yes(g["int8"])],
        [f"bottleneck+int8 at cut {b['cut']}",
         f"{b['bytes_sent']:.0f} B/request ({b['bytes_sent_zlib']:.0f} with zlib) "
         f"vs fp32 {b['bytes_fp32']:,} B, image {b['image_bytes']} B ({b['image_bytes_zlib']:.0f} zlib)",
         f"{100 * b['acc_after']:.2f}", f"{b['acc_drop_points']:+.2f}", "<= 392 B, <= 1.0", _yes(g["bottleneck"])],
        ["calibrated exits", f"{e['mac_ratio']:.2f}x fewer device MACs ({e['mean_device_macs']:,} of "
         f"{e['final_macs']:,}); {e['confidence']} thresholds {e['thresholds']}",
         f"{100 * e['acc_after']:.2f}", f"{e['acc_drop_points']:+.2f}", ">= 2x, <= 0.5", _yes(g["exits"])],
    ]
    lines = [f"shipped resnet_fm final exit: {100 * r['reference_accuracy']:.2f}% on {r['test_images']:,} test images",
             "", table(["compression", "what", "acc %", "drop (pts)", "goal", ""], rows), "",
             f"int8 latency (ms, median, {q['torch_threads']} torch threads): " + ", ".join(
                 f"b{k}: fp32 {v['fp32_ms']:.2f} / int8 {v['int8_ms']:.2f}" for k, v in q["latency_ms"].items()),
             *([f"pruned student, final output: {100 * p['train_accuracy']:.2f}% on {p['train_images']:,} of its "
                f"training images, {100 * p['val_accuracy']:.2f}% on the validation split, "
                f"{100 * p['acc_after']:.2f}% on the test images"] if "train_accuracy" in p else []),
             "", f"rate–accuracy ({r['rate_curve_images']:,} test images, where the shipped model scores "
             f"{100 * r.get('rate_curve_reference', r['reference_accuracy']):.2f}%; bytes per request "
             "raw/zlib, accuracy %):"]
    by_cut: dict[int, list[str]] = {}
    for pt in r["rate_curve"]:
        by_cut.setdefault(pt["cut"], []).append(f"{pt['codec']} {pt['bytes']:.0f}/{pt['bytes_zlib']:.0f}z "
                                                f"{100 * pt['accuracy']:.2f}")
    lines += [f"  cut {c:>2}: " + "; ".join(v) for c, v in sorted(by_cut.items())]
    return "\n".join(lines)


def plot(r: dict, path: str) -> None:
    from edgesplit.partitioner.compress.plots import plot_rate_accuracy, plot_size_accuracy

    # the curve's own images set its reference; the bottleneck points are on the whole test set
    plot_rate_accuracy(r["rate_curve"], r.get("bottleneck_on_curve", []),
                       r.get("rate_curve_reference", r["reference_accuracy"]), path)
    p, e = r["pruning"], r["exits"]
    points = [{"label": "shipped", "params": p["params_before"], "macs": p["macs_before"],
               "accuracy": r["reference_accuracy"]},
              {"label": "pruned + distilled", "params": p["params_after"], "macs": p["macs_after"],
               "accuracy": p["acc_after"]},
              {"label": "calibrated exits", "params": None, "macs": e["mean_device_macs"], "accuracy": e["acc_after"]}]
    plot_size_accuracy(points, str(Path(path).with_name(Path(path).stem + "_size.png")))

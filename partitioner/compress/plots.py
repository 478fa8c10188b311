"""Plots of compression results: accuracy against parameters and MACs, and the
rate–accuracy curve (accuracy against bytes sent per request) of every codec at every cut.

Both take plain dictionaries (the JSON a compress run or ``edgesplit bench compress``
writes), so the pipeline and the benchmark draw the same pictures.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgesplit.models.datasets import IMAGE_BYTES


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_size_accuracy(points: list[dict], path: str | Path, title: str = "Fashion-MNIST test") -> None:
    """``points``: ``label``, ``params``, ``macs`` (mean per sample) and ``accuracy`` (0..1)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, name in ((axes[0], "params", "parameters"), (axes[1], "macs", "MACs per sample (mean)")):
        for p in points:
            if p.get(key):
                ax.plot(p[key], 100 * p["accuracy"], "o")
                ax.annotate(p["label"], (p[key], 100 * p["accuracy"]), textcoords="offset points", xytext=(5, 4),
                            fontsize=8)
        ax.set_xscale("log")
        ax.set(xlabel=name, ylabel="accuracy (%)", title=f"accuracy vs {name.split()[0]} ({title})")
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_rate_accuracy(curve: list[dict], bottlenecks: list[dict], reference: float, path: str | Path) -> None:
    """Accuracy against bytes per request: one line per codec (points are cuts), zlib dashed,
    bottleneck+int8 points, the uint8 image's size and half of it for reference."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    codecs = sorted({p["codec"] for p in curve}, key=["fp32", "fp16", "int8", "int8-channel"].index)
    for i, codec in enumerate(codecs):
        pts = sorted((p for p in curve if p["codec"] == codec), key=lambda p: p["cut"])
        color = f"C{i}"
        ax.plot([p["bytes"] for p in pts], [100 * p["accuracy"] for p in pts], "o-", color=color, ms=3,
                label=f"{codec} (cuts {pts[0]['cut']}..{pts[-1]['cut']})")
        ax.plot([p["bytes_zlib"] for p in pts], [100 * p["accuracy"] for p in pts], "x--", color=color, ms=3,
                alpha=0.6, label=f"{codec} + zlib")
    if bottlenecks:
        for key, marker, suffix in (("bytes", "*", ""), ("bytes_zlib", "P", " + zlib")):
            ax.scatter([b[key] for b in bottlenecks], [100 * b["test_accuracy"] for b in bottlenecks], marker=marker,
                       s=80, color="k", zorder=5, label=f"bottleneck+int8{suffix}")
        for b in bottlenecks:
            ax.annotate(f"cut {b['cut']}, {b['channels']} ch", (b["bytes"], 100 * b["test_accuracy"]),
                        textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.axvline(IMAGE_BYTES, color="grey", ls=":", label="uint8 image (784 B)")
    ax.axvline(IMAGE_BYTES / 2, color="grey", ls="-.", label="half the image (392 B)")
    ax.axhline(100 * reference, color="grey", lw=0.8)
    ax.axhline(100 * reference - 1, color="red", lw=0.8, ls=":", label="1 point below the shipped model")
    ax.set_xscale("log")
    low = min([100 * p["accuracy"] for p in curve] + [100 * b["test_accuracy"] for b in bottlenecks] + [100])
    ax.set_ylim(max(low - 1, 100 * reference - 10), 100 * reference + 1)
    ax.set(xlabel="bytes sent per request", ylabel="accuracy (%)",
           title="rate–accuracy of every codec at every cut (resnet_fm, Fashion-MNIST test)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def size_points(results: dict) -> list[dict]:
    """The accuracy-versus-size points of a set of step results (keys: prune, int8, exits)."""
    points = []
    prune = results.get("prune")
    if prune:
        points.append({"label": "shipped", "params": prune["params_before"], "macs": prune.get("macs_before"),
                       "accuracy": prune["acc_before"]})
        points.append({"label": "pruned + distilled", "params": prune["params_after"],
                       "macs": prune.get("macs_after"), "accuracy": prune["acc_after"]})
    exits = results.get("exits")
    if exits:
        points.append({"label": "calibrated exits", "params": None, "macs": exits["mean_device_macs"],
                       "accuracy": exits["acc_after"]})
    return points


def plot_results(out: Path) -> list[Path]:
    """Draw what the finished steps in ``out`` allow; return the files written."""
    results = {}
    for step in ("prune", "int8", "bottleneck", "exits", "rate"):
        f = Path(out) / f"{step}.json"
        if f.exists():
            results[step] = json.loads(f.read_text())
    written = []
    points = size_points(results)
    if points:
        plot_size_accuracy(points, Path(out) / "size_accuracy.png")
        written.append(Path(out) / "size_accuracy.png")
    if "rate" in results:
        bottlenecks = (results.get("bottleneck") or {}).get("candidates", [])
        plot_rate_accuracy(results["rate"]["curve"], bottlenecks, results["rate"]["reference"],
                           Path(out) / "rate_accuracy.png")
        written.append(Path(out) / "rate_accuracy.png")
    return written

"""Accuracy of the shipped ``resnet_fm`` at every exit, and of the early-exit cascade.

Evaluates on the full 10,000-image Fashion-MNIST test set (``--quick``: the first 2,000),
and for a range of thresholds the share of samples that leave at each exit and the
accuracy of the cascade (first exit whose max-softmax clears the threshold answers).
"""

from __future__ import annotations

import torch

from edgesplit.bench import machine_info, table
from edgesplit.models import load_trained
from edgesplit.models.datasets import load_images, to_tensor
from edgesplit.models.weights_io import sha256_file

THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


def cascade(probs: list[torch.Tensor], labels: torch.Tensor, threshold: float) -> dict:
    """Exit shares and accuracy when each sample leaves at the first confident exit."""
    n = len(labels)
    remaining = torch.ones(n, dtype=torch.bool)
    chosen = torch.zeros(n, dtype=torch.long)
    shares = []
    for i, p in enumerate(probs):
        conf, pred = p.max(1)
        leave = remaining & ((conf >= threshold) if i < len(probs) - 1 else torch.ones(n, dtype=torch.bool))
        chosen[leave] = pred[leave]
        shares.append(float(leave.sum()) / n)
        remaining &= ~leave
    return {"threshold": threshold, "exit_shares": shares, "accuracy": float((chosen == labels).float().mean())}


def run(quick: bool = False, progress: bool = True) -> dict:
    from edgesplit.models import WEIGHTS_DIR

    model = load_trained("resnet_fm")
    images, labels = load_images("test")
    if quick:
        images, labels = images[:2000], labels[:2000]
    x, y = to_tensor(images), torch.from_numpy(labels).long()
    outs: list[list[torch.Tensor]] = []
    with torch.inference_mode():
        for start in range(0, len(y), 500):
            outs.append([o.softmax(1) for o in model.forward_exits(x[start : start + 500])])
    probs = [torch.cat([o[i] for o in outs]) for i in range(len(outs[0]))]
    names = [f"exit@{c}" for c in model.exit_cuts] + ["final"]
    cuts = model.exit_cuts + [model.num_blocks]
    exits = [
        {"name": n, "cut": c, "accuracy": float((p.argmax(1) == y).float().mean())}
        for n, c, p in zip(names, cuts, probs)
    ]
    return {
        "model": "resnet_fm",
        "weights_sha256": sha256_file(WEIGHTS_DIR / "resnet_fm.safetensors"),
        "dataset": "Fashion-MNIST test set",
        "images": len(y),
        "exits": exits,
        "final_accuracy": exits[-1]["accuracy"],
        "goal_final_accuracy": 0.92,
        "cascade": [cascade(probs, y, t) for t in THRESHOLDS],
        "machine": machine_info(),
    }


def render(result: dict) -> str:
    rows = [[e["name"], e["cut"], f"{100 * e['accuracy']:.2f}%"] for e in result["exits"]]
    out = [f"resnet_fm on {result['images']} {result['dataset']} images", table(["exit", "cut", "top-1"], rows), ""]
    names = [e["name"] for e in result["exits"]]
    rows = [
        [f"{c['threshold']:.2f}", *[f"{100 * s:.1f}%" for s in c["exit_shares"]], f"{100 * c['accuracy']:.2f}%"]
        for c in result["cascade"]
    ]
    out += ["early-exit cascade (share leaving at each exit, cascade accuracy)",
            table(["threshold", *names, "accuracy"], rows)]
    ok = result["final_accuracy"] >= result["goal_final_accuracy"]
    out.append(f"\nfinal exit {100 * result['final_accuracy']:.2f}% "
               f"({'meets' if ok else 'MISSES'} the {100 * result['goal_final_accuracy']:.0f}% goal)")
    return "\n".join(out)

"""Statistics of a teacher's final convolutional filters, from its activations on training data.

The final filters are the channels of the tensor the classifier reads (the last cut before
the classifier block). Per image, each filter's map is average-pooled to one number; the
filter graph weights a pair of filters by how their pooled activations move together
(positive Pearson correlation over the images; negative correlation counts as no edge).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from edgesplit.models.split_model import SplitModel


def feature_cut(teacher: SplitModel) -> int:
    """The cut whose tensor the classifier reads: the output of the final convolutional block."""
    return teacher.num_blocks - 1


@torch.no_grad()
def teacher_outputs(
    teacher: SplitModel, images: torch.Tensor, batch_size: int = 500, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's final feature maps (float16, [N, C, H, W]) and logits ([N, classes])."""
    teacher = teacher.eval()
    cut = feature_cut(teacher)
    maps, logits = [], []
    for start in tqdm(range(0, len(images), batch_size), desc="teacher", unit="batch", disable=not progress):
        h = teacher.run(images[start : start + batch_size], 0, cut)
        maps.append(h.to(torch.float16))
        logits.append(teacher.run(h, cut))
    return torch.cat(maps), torch.cat(logits)


def pooled_activations(maps: torch.Tensor) -> np.ndarray:
    """Per-image, per-filter mean activation ([N, C] float64) of feature maps [N, C, H, W]."""
    return maps.float().mean(dim=(2, 3)).double().numpy()


def filter_graph(pooled: np.ndarray) -> np.ndarray:
    """Symmetric, non-negative filter co-activation weights ([C, C], zero diagonal).

    A filter that never varies (dead) has no edges; the partitioners still place it.
    """
    if pooled.ndim != 2 or pooled.shape[0] < 2:
        raise ValueError(f"need pooled activations [images >= 2, filters], got shape {pooled.shape}")
    centred = pooled - pooled.mean(axis=0)
    std = centred.std(axis=0)
    live = std > 1e-12
    z = np.zeros_like(centred)
    z[:, live] = centred[:, live] / std[live]
    corr = z.T @ z / len(z)
    graph = np.clip(corr, 0.0, None)
    np.fill_diagonal(graph, 0.0)
    return (graph + graph.T) / 2


def summary(pooled: np.ndarray, graph: np.ndarray, decimals: int = 8) -> dict:
    """The statistics a partition came from, as JSON-ready lists (kept in the bundle's manifest)."""
    return {
        "filters": int(pooled.shape[1]),
        "images": int(pooled.shape[0]),
        "pooled_mean": np.round(pooled.mean(axis=0), decimals).tolist(),
        "pooled_std": np.round(pooled.std(axis=0), decimals).tolist(),
        "graph": np.round(graph, decimals).tolist(),
        "graph_weight": "positive Pearson correlation of per-image average-pooled activations",
    }

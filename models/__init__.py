"""Model zoo: split models with cut points and exits, data, training, shipped weights.

Example::

    >>> from edgesplit.models import build_model, load_trained
    >>> sorted(MODELS)
    ['mobilenet_v2', 'resnet18', 'resnet_fm']
    >>> model = load_trained("resnet_fm")     # shipped weights, verified
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .imagenet import build_mobilenet_v2, build_resnet18
from .resnet_fm import build_resnet_fm
from .split_model import CutPoint, SplitModel, confidence

WEIGHTS_DIR = Path(__file__).parent / "weights"

MODELS: dict[str, Callable[[], SplitModel]] = {
    "resnet_fm": build_resnet_fm,
    "resnet18": build_resnet18,
    "mobilenet_v2": build_mobilenet_v2,
}


def build_model(name: str) -> SplitModel:
    """A freshly initialised model from the registry."""
    try:
        return MODELS[name]()
    except KeyError:
        raise KeyError(f"unknown model {name!r}; the zoo has {sorted(MODELS)}") from None


def load_trained(name: str, weights: str | Path | None = None) -> SplitModel:
    """A registry model with trained weights (the shipped ones by default), in eval mode."""
    from .weights_io import load_weights

    model = build_model(name)
    path = Path(weights) if weights else WEIGHTS_DIR / f"{name}.safetensors"
    load_weights(model, path)
    return model.eval()


__all__ = ["MODELS", "CutPoint", "SplitModel", "build_model", "confidence", "load_trained", "WEIGHTS_DIR"]

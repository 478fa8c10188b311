"""Save and load model weights as safetensors with a sha256 side file; never pickle.

The card (``<name>.json`` beside the weights) records the file's sha256; loading checks it
and refuses weights that differ.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .split_model import SplitModel


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_weights(model: SplitModel, path: str | Path) -> str:
    """Write the state dict as safetensors; return its sha256."""
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"model": model.name})
    return sha256_file(path)


def card_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def load_weights(model: SplitModel, path: str | Path, verify: bool = True) -> None:
    """Load safetensors weights into ``model``, checking the sha256 recorded in the card."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no weights at {path}; train them with 'edgesplit train {model.name}'")
    card = card_path(path)
    if verify and card.exists():
        expected = json.loads(card.read_text()).get("sha256")
        actual = sha256_file(path)
        if expected and expected != actual:
            raise ValueError(f"{path}: sha256 {actual} differs from {expected} recorded in {card}; refusing to load")
    state = load_file(str(path))
    model.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()})

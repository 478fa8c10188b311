"""Resumable training checkpoints: one safetensors file per training run holding the model
and optimizer state, with the progress, the layer shapes and the configuration it was made
with in the file's metadata.

A checkpoint is written after every epoch, atomically (a temporary file, then a rename),
so an interrupted ``edgesplit compress`` run resumes from its last finished epoch, and
weights and progress can never disagree. The layer shapes are stored so a pruned model is
rebuilt before its weights load. A checkpoint made with another configuration is refused
rather than silently reused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .architecture import layer_shapes


class CheckpointMismatch(ValueError):
    """A checkpoint from another configuration: delete it to start that training afresh."""


def _file(path: str | Path) -> Path:
    return Path(path).with_suffix(".safetensors")


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    progress: dict, extra: dict[str, nn.Module] | None = None, config: dict | None = None) -> None:
    """Write ``path``.safetensors (``progress`` and ``config`` must be JSON-able)."""
    target = _file(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    for name, module in (extra or {}).items():
        tensors.update({f"{name}.{k}": v.detach().contiguous().clone() for k, v in module.state_dict().items()})
    if optimizer is not None:
        for i, state in optimizer.state_dict()["state"].items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{i}.{key}"] = value.detach().contiguous().clone()
    meta = {"progress": json.dumps(progress), "layers": json.dumps(layer_shapes(model)),
            "config": json.dumps(config, sort_keys=True)}
    tmp = target.with_suffix(".safetensors.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, target)


def read_progress(path: str | Path, config: dict | None = None) -> dict | None:
    """``{"progress", "layers"}`` of the checkpoint at ``path``, or None when there is none.

    With ``config``, a checkpoint made with another configuration raises
    :class:`CheckpointMismatch`."""
    target = _file(path)
    if not target.exists():
        return None
    try:
        with safe_open(str(target), framework="pt") as f:
            meta = f.metadata() or {}
        saved = {"progress": json.loads(meta["progress"]), "layers": json.loads(meta["layers"])}
        saved_config = json.loads(meta.get("config", "null"))
    except Exception as exc:  # corrupt or foreign file
        raise CheckpointMismatch(f"{target} is not a readable checkpoint ({exc}); delete it") from None
    if config is not None and saved_config != json.loads(json.dumps(config, sort_keys=True)):
        raise CheckpointMismatch(f"{target} was made with another configuration; delete it to train afresh")
    return saved


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    extra: dict[str, nn.Module] | None = None) -> dict:
    """Load a checkpoint into ``model`` (already rebuilt to its layer shapes) and ``optimizer``;
    return its progress."""
    target = _file(path)
    tensors = load_file(str(target))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for name, module in (extra or {}).items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    if optimizer is not None:
        state = optimizer.state_dict()
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, field = key.split(".", 2)
                state["state"].setdefault(int(index), {})[field] = value
        optimizer.load_state_dict(state)
    with safe_open(str(target), framework="pt") as f:
        return json.loads((f.metadata() or {})["progress"])


def fast_forward(schedule: torch.optim.lr_scheduler.LRScheduler, steps: int) -> None:
    """Advance a learning-rate schedule by ``steps`` (a resumed run's finished epochs)
    without optimizer steps; torch warns about that order, which is intended here."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            schedule.step()


def remove_checkpoints(folder: str | Path, prefix: str) -> None:
    """Delete the checkpoints whose names start with ``prefix`` (a finished step's)."""
    for file in Path(folder).glob(f"{prefix}*.safetensors"):
        file.unlink()

"""Count multiply-accumulates per block and per exit of a split model, by tracing shapes.

Example::

    >>> from edgesplit.models import build_model
    >>> from edgesplit.partitioner.flops import block_macs
    >>> macs = block_macs(build_model("resnet_fm"))
    >>> len(macs)
    11
"""

from __future__ import annotations

import torch
from torch import nn

from edgesplit.models.split_model import SplitModel


def _module_macs(module: nn.Module, out: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        per_output = (module.in_channels // module.groups) * kh * kw
        return int(out[0].numel() * per_output)
    if isinstance(module, nn.Linear):
        return int(module.in_features * module.out_features)
    return 0


def macs_of(module: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """MACs of one sample through ``module`` (conv and linear layers), and its output."""
    total = 0

    def hook(m, i, o):
        nonlocal total
        total += _module_macs(m, o)

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            out = module(x)
    finally:
        for h in handles:
            h.remove()
    return total, out


def block_macs(model: SplitModel) -> list[int]:
    """MACs of each block for one sample."""
    was_training = model.training
    model.eval()
    h = torch.zeros(1, *model.input_shape)
    result = []
    for block in model.blocks:
        macs, h = macs_of(block, h)
        result.append(macs)
    model.train(was_training)
    return result


def exit_macs(model: SplitModel) -> dict[int, int]:
    """MACs of each exit head for one sample, keyed by its cut."""
    was_training = model.training
    model.eval()
    cuts = model.cut_points()
    result = {}
    for cut in model.exit_cuts:
        result[cut], _ = macs_of(model.exits[str(cut)], torch.zeros(1, *cuts[cut].shape))
    model.train(was_training)
    return result


def mac_summary(model: SplitModel) -> dict:
    """MACs per block and per exit, as a model card records them."""
    return {"blocks": block_macs(model), "exits": {str(k): v for k, v in exit_macs(model).items()}}

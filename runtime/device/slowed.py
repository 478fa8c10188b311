"""A device class emulated by time: every block of a split model takes ``1 / quota`` times as long.

The benchmarks emulate a slow device with a real CPU quota (a cgroup, root only), under
which a request waits out whole CFS periods. The demo must run anywhere, as any user, so
it stretches the device's compute instead: each block (and exit head) runs at full speed,
then the device sleeps ``(1 / quota - 1)`` times the block's measured time. The result
behaves like a CPU ``1 / quota`` times slower, smoothly, without a cgroup; the device's
other work (encoding, gRPC) is not stretched.

Example::

    >>> from edgesplit.models import build_model
    >>> slow = slowed(build_model("resnet_fm"), quota=0.05)   # the mcu class: 20 times slower
    >>> slow.num_blocks == build_model("resnet_fm").num_blocks
    True
"""

from __future__ import annotations

import time

import torch
from torch import nn

from edgesplit.models.split_model import SplitModel
from edgesplit.partitioner.profile import median_seconds


class Stretched(nn.Module):
    """Runs ``module``, then sleeps ``extra_s`` per input row: the time a slower CPU would add."""

    def __init__(self, module: nn.Module, extra_s: float) -> None:
        super().__init__()
        self.module = module
        self.extra_s = extra_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x)
        time.sleep(self.extra_s * x.shape[0])
        return out


def slowed(model: SplitModel, quota: float) -> SplitModel:
    """A copy of ``model`` sharing its weights whose blocks and exits run ``1 / quota`` times slower.

    Each block's (and exit's) time for one input is measured here once (median of 7 after a warm-up); the
    copy sleeps ``(1 / quota - 1)`` times that after every call. A fixed added time, not a
    multiple of each call's own: a call slowed by something else (another thread holding
    the interpreter, the scheduler) is not slowed 20 times more.
    """
    if not 0 < quota <= 1:
        raise ValueError(f"quota must be a fraction of a core in (0, 1], not {quota!r}")
    extra = 1 / quota - 1
    model = model.eval()
    h = torch.zeros(1, *model.input_shape)
    blocks, exits = [], {}
    with torch.inference_mode():
        for index, (name, block) in enumerate(zip(model.block_names, model.blocks), start=1):
            blocks.append((name, Stretched(block, extra * median_seconds(lambda b=block, x=h: b(x), 7))))
            h = block(h)
            if index in model.exit_cuts:
                head = model.exits[str(index)]
                exits[index] = Stretched(head, extra * median_seconds(lambda m=head, x=h: m(x), 7))
    slow = SplitModel(model.name, blocks, exits, model.input_shape, model.num_classes)
    slow._cuts = model.cut_points()  # same shapes; no need to trace them slowly
    return slow.eval()

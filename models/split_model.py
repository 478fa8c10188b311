"""A model as a chain of blocks with named cut points and early-exit heads.

Cut ``k`` lies after the first ``k`` blocks: cut 0 is the input, cut ``len(blocks)`` the
final output. The head of a split at cut ``k`` runs ``blocks[:k]``, the tail
``blocks[k:]``. An exit is a small classifier attached at a cut.

Example::

    >>> import torch
    >>> from edgesplit.models import build_model
    >>> model = build_model("resnet_fm").eval()
    >>> x = torch.zeros(1, 1, 28, 28)
    >>> h = model.run(x, 0, 4)          # head: cuts 0..4
    >>> y = model.run(h, 4)             # tail: cut 4 to the end
    >>> torch.allclose(y, model(x))
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class CutPoint:
    """A place where the chain can be split, and the tensor that crosses it."""

    index: int
    name: str
    shape: tuple[int, ...]  # per-sample shape of the crossing tensor
    dtype: str = "float32"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class SplitModel(nn.Module):
    """A chain of named blocks plus exit heads keyed by the cut they read."""

    def __init__(
        self,
        name: str,
        blocks: Sequence[tuple[str, nn.Module]],
        exits: dict[int, nn.Module],
        input_shape: tuple[int, ...],
        num_classes: int,
    ) -> None:
        super().__init__()
        self.name = name
        self.block_names = [n for n, _ in blocks]
        self.blocks = nn.ModuleList([m for _, m in blocks])
        for cut in exits:
            if not 0 < cut < len(self.blocks):
                raise ValueError(f"exit at cut {cut} is outside 1..{len(self.blocks) - 1}")
        self.exits = nn.ModuleDict({str(k): exits[k] for k in sorted(exits)})
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self._cuts: list[CutPoint] | None = None

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def exit_cuts(self) -> list[int]:
        """Cuts that carry an early exit, in order (the final output is not listed)."""
        return [int(k) for k in self.exits]

    def cut_points(self) -> list[CutPoint]:
        """Every cut 0..num_blocks with the shape of its crossing tensor (traced once)."""
        if self._cuts is None:
            names = ["input"] + self.block_names
            shapes = [self.input_shape]
            was_training = self.training
            self.eval()
            with torch.no_grad():
                h = torch.zeros(1, *self.input_shape)
                for block in self.blocks:
                    h = block(h)
                    shapes.append(tuple(h.shape[1:]))
            self.train(was_training)
            self._cuts = [CutPoint(i, names[i], s) for i, s in enumerate(shapes)]
        return self._cuts

    def check_cut(self, cut: int) -> int:
        if not isinstance(cut, int) or not 0 <= cut <= self.num_blocks:
            raise ValueError(f"cut must be an integer in 0..{self.num_blocks}, not {cut!r}")
        return cut

    def run(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Run blocks ``start..stop`` (cut indices) on the tensor crossing cut ``start``."""
        stop = self.num_blocks if stop is None else stop
        self.check_cut(start)
        self.check_cut(stop)
        if stop < start:
            raise ValueError(f"stop cut {stop} is before start cut {start}")
        blocks = self.blocks
        for i in range(start, stop):  # not blocks[start:stop]: slicing builds a new ModuleList per call
            x = blocks[i](x)
        return x

    def exit_logits(self, cut: int, h: torch.Tensor) -> torch.Tensor:
        """Logits of the exit attached at ``cut`` for the tensor crossing it."""
        key = str(cut)
        if key not in self.exits:
            raise KeyError(f"{self.name} has no exit at cut {cut}; exits are at {self.exit_cuts}")
        return self.exits[key](h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)

    def forward_exits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every early exit, then of the final classifier (for joint training)."""
        outputs = []
        h = x
        for i, block in enumerate(self.blocks):
            h = block(h)
            if str(i + 1) in self.exits:
                outputs.append(self.exits[str(i + 1)](h))
        outputs.append(h)
        return outputs


CONFIDENCES = ("max_softmax", "entropy")


def confidence(logits: torch.Tensor, kind: str = "max_softmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence in [0, 1] and predicted class of each row of ``logits``: the largest
    softmax probability (``max_softmax``), or one minus the softmax's entropy over its
    largest possible value, log K (``entropy``)."""
    probs = torch.softmax(logits.float(), dim=-1)
    conf, pred = probs.max(dim=-1)
    if kind == "entropy":
        h = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
        return 1 - h / math.log(probs.shape[-1]), pred
    if kind != "max_softmax":
        raise ValueError(f"confidence must be one of {CONFIDENCES}, not {kind!r}")
    return conf, pred

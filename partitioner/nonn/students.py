"""NoNN students, the bank that trains them together, and the aggregator that classifies.

A :class:`Student` maps an image to feature maps with one channel per teacher filter of
its part (same spatial size as the teacher's final maps); its answer on the wire is those
maps average-pooled: one number per filter. The :class:`StudentBank` holds all S students
as grouped convolutions (group ``i`` is student ``i``), which trains S small networks at
the cost of a few wide layers; :meth:`StudentBank.member` extracts a standalone student
with identical outputs. The :class:`Aggregator` averages the answers of a part's replicas,
puts the training mean in place of a part nobody answered, and applies a linear classifier
to the teacher's feature layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .partition import Partition

DEFAULT_WIDTHS = (8, 16, 32)


def _conv_bn(cin: int, cout: int, stride: int = 1, groups: int = 1, kernel: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _trunk(widths: Sequence[int], members: int) -> nn.Sequential:
    """Five 3x3 conv layers (28 -> 14 -> 7), ``members`` independent copies as conv groups."""
    c1, c2, c3 = (w * members for w in widths)
    g = members
    return nn.Sequential(
        *_conv_bn(1, c1), *_conv_bn(c1, c2, 2, g), *_conv_bn(c2, c2, 1, g),
        *_conv_bn(c2, c3, 2, g), *_conv_bn(c3, c3, 1, g),
    )


class Student(nn.Module):
    """One member: image [N, 1, 28, 28] -> its part's feature maps [N, filters, 7, 7]."""

    def __init__(self, filters: int, widths: Sequence[int] = DEFAULT_WIDTHS) -> None:
        super().__init__()
        self.filters, self.widths = filters, tuple(widths)
        self.trunk = _trunk(widths, 1)
        self.head = nn.Sequential(*_conv_bn(widths[2], filters, kernel=1))

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The member's answer: its feature maps average-pooled, [N, filters]."""
        return self.maps(x).mean(dim=(2, 3))


class StudentBank(nn.Module):
    """All members of a partition, computed together; ``maps`` returns one tensor per member."""

    def __init__(self, partition: Partition, widths: Sequence[int] = DEFAULT_WIDTHS) -> None:
        super().__init__()
        self.partition, self.widths = partition, tuple(widths)
        self.trunk = _trunk(widths, partition.members)
        self.heads = nn.ModuleList(
            nn.Sequential(*_conv_bn(widths[2], len(partition.member_filters(i)), kernel=1))
            for i in range(partition.members)
        )

    def maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        shared = self.trunk(x).chunk(self.partition.members, dim=1)
        return [head(h) for head, h in zip(self.heads, shared)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [m.mean(dim=(2, 3)) for m in self.maps(x)]

    @torch.no_grad()
    def member(self, index: int) -> Student:
        """Student ``index`` as a standalone network with the same weights (eval mode)."""
        student = Student(len(self.partition.member_filters(index)), self.widths)
        members = self.partition.members
        for mine, bank in zip(student.trunk, self.trunk):
            if isinstance(mine, nn.Conv2d):
                mine.weight.copy_(bank.weight.chunk(members, dim=0)[index])
            elif isinstance(mine, nn.BatchNorm2d):
                for name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(mine, name).copy_(getattr(bank, name).chunk(members)[index])
        student.head.load_state_dict(self.heads[index].state_dict())
        return student.eval()


class Aggregator(nn.Module):
    """Combine the members that answered and classify.

    Replicas of a part are averaged; a part with no answering member takes its training
    mean (``filter_mean``); the result, in the teacher's filter order, goes through a linear
    classifier (initialised from the teacher's).
    """

    def __init__(self, partition: Partition, filter_mean: torch.Tensor, num_classes: int = 10) -> None:
        super().__init__()
        if filter_mean.shape != (partition.filters,):
            raise ValueError(f"filter_mean must have {partition.filters} entries, got {tuple(filter_mean.shape)}")
        self.partition = partition
        self.register_buffer("filter_mean", filter_mean.float().clone())
        self.classifier = nn.Linear(partition.filters, num_classes)
        for p, part in enumerate(partition.parts):
            self.register_buffer(f"_index{p}", torch.tensor(part, dtype=torch.long), persistent=False)
        self._replicas = [partition.replicas(p) for p in range(len(partition.parts))]  # once, not per request

    def features(self, answers: Sequence[torch.Tensor], present: torch.Tensor) -> torch.Tensor:
        """The teacher-layout feature vector [N, C] from every member's answer and a presence mask [N, S]."""
        n = present.shape[0]
        out = self.filter_mean.expand(n, -1).clone()
        present = present.to(out.dtype)
        for p, replicas in enumerate(self._replicas):
            weights = present[:, replicas]  # [N, R]
            count = weights.sum(dim=1, keepdim=True)
            # where(), not a product: an absent member's placeholder (even NaN) must not leak in
            total = sum(torch.where(weights[:, k : k + 1] > 0, answers[i], 0.0) for k, i in enumerate(replicas))
            index = getattr(self, f"_index{p}")
            mean = out[:, index]
            out[:, index] = torch.where(count > 0, total / count.clamp(min=1), mean)
        return out

    def forward(self, answers: Sequence[torch.Tensor], present: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(answers, present))

    def combine(self, answers: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """Logits from the members that answered (``{member: [N, filters]}``); others count as failed."""
        if not answers:
            raise ValueError("no member answered; classify with a fallback instead")
        unknown = sorted(set(answers) - set(range(self.partition.members)))
        if unknown:
            raise ValueError(f"members {unknown} are not in this ensemble (0..{self.partition.members - 1})")
        sample = next(iter(answers.values()))
        n = sample.shape[0]
        present = torch.zeros(n, self.partition.members)
        full = []
        for i in range(self.partition.members):
            width = len(self.partition.member_filters(i))
            answer = answers.get(i)
            if answer is None:
                full.append(torch.zeros(n, width))
                continue
            if tuple(answer.shape) != (n, width):
                raise ValueError(f"member {i} answered shape {tuple(answer.shape)}, expected {(n, width)}")
            present[:, i] = 1.0
            full.append(answer.float())
        return self(full, present)

"""Structured pruning of split models with Torch-Pruning's dependency graph.

Torch-Pruning traces the model (every exit included, so an exit head loses the channels
of the block it reads), groups the layers whose channels are coupled (residual additions,
batch norms, the next layer's inputs) and removes whole channels by a group importance:
``magnitude`` (L2 norm of the weights), ``bn_scale`` (the batch norm's |gamma|) or
``taylor`` (|weight x gradient| on a batch of training data). Classifier outputs are never
pruned.

:func:`prune_to` removes a target fraction of the parameters, globally (one importance
ranking over all groups) or with the same channel ratio in every layer; the ratio that
reaches the target is found by bisection. Global ranking compares channels of layers
that cost very different numbers of parameters (on ``resnet_fm``, three rounds of it left
the first stage 3 channels wide, one inner convolution 1): ``isomorphic`` ranks each group
only against groups of the same structure instead (isomorphic pruning, Torch-Pruning's
``isomorphic=True``, ECCV 2024). :func:`adapt_bn` re-estimates the batch-norm
statistics after a pruning step (adaptive BN). :func:`sweep` measures the accuracy of
one-shot pruning at several rates and :func:`knee` picks the rate at the knee of that curve
(Kneedle). :func:`prune_to_widths` prunes to widths set by hand instead (a convolution's
module path to its channels, its coupled group following).

Example::

    >>> from edgesplit.models import build_model
    >>> model = build_model("resnet_fm")
    >>> pruned = prune_to(model, removed=0.5)
    >>> 0.5 <= 1 - count_params(pruned) / count_params(model) < 0.6
    True
    >>> knee([0.0, 0.2, 0.4, 0.6, 0.8], [0.93, 0.93, 0.92, 0.85, 0.5])
    3
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from torch import nn

from edgesplit.models.split_model import SplitModel

IMPORTANCES = ("magnitude", "bn_scale", "taylor")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _tp():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch_pruning

    return torch_pruning


def _importance(name: str):
    tp = _tp()
    if name == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "bn_scale":
        return tp.importance.BNScaleImportance()
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    raise ValueError(f"importance must be one of {IMPORTANCES}, not {name!r}")


def _classifiers(model: SplitModel) -> list[nn.Module]:
    """Layers whose outputs are class logits: they keep every output."""
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == model.num_classes]


def _all_outputs(model: SplitModel, x: torch.Tensor):
    return model.forward_exits(x)


def _sum_outputs(outputs) -> torch.Tensor:
    return sum(o.sum() for o in outputs)


def _has_gradients(model: nn.Module) -> bool:
    return any(p.grad is not None for p in model.parameters())


def _gradients(model: SplitModel, calibration: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Gradients of the exits' summed cross-entropy on ``calibration`` (for ``taylor``)."""
    model.zero_grad(set_to_none=True)
    was_training = model.training
    model.eval()
    x, y = calibration
    sum(nn.functional.cross_entropy(o, y) for o in model.forward_exits(x)).backward()
    model.train(was_training)


def _copy_with_gradients(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    for a, b in zip(model.parameters(), twin.parameters()):
        if a.grad is not None:
            b.grad = a.grad.clone()
    return twin


def prune_once(model: SplitModel, ratio: float, importance: str = "magnitude", global_pruning: bool = True,
               calibration: tuple[torch.Tensor, torch.Tensor] | None = None, *,
               isomorphic: bool = False) -> SplitModel:
    """Remove channels from ``model`` in place at channel ratio ``ratio``; return it.

    ``calibration`` (images, labels) is needed by the ``taylor`` importance, which reads
    gradients of the exits' summed cross-entropy."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"pruning ratio must be in [0, 1), not {ratio}")
    tp = _tp()
    example = torch.zeros(2, *model.input_shape)
    if importance == "taylor" and not _has_gradients(model):
        if calibration is None:
            raise ValueError("the taylor importance needs calibration images and labels")
        _gradients(model, calibration)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            model, example, importance=_importance(importance), pruning_ratio=ratio,
            global_pruning=global_pruning, isomorphic=isomorphic and global_pruning,
            max_pruning_ratio=0.95, ignored_layers=_classifiers(model),
            forward_fn=_all_outputs, output_transform=_sum_outputs,
        )
        pruner.step()
    model.zero_grad(set_to_none=True)
    model._cuts = None
    return model


def prune_to(model: SplitModel, removed: float, importance: str = "magnitude", global_pruning: bool = True,
             calibration: tuple[torch.Tensor, torch.Tensor] | None = None, tolerance: float = 0.002, *,
             isomorphic: bool = False) -> SplitModel:
    """A pruned copy of ``model`` with at least ``removed`` of its parameters removed (and
    less than ``removed + tolerance`` where the channel granularity allows)."""
    if not 0.0 <= removed < 1.0:
        raise ValueError(f"the removed fraction must be in [0, 1), not {removed}")
    before = count_params(model)
    target = (1.0 - removed) * before
    source = model
    if importance == "taylor":  # gradients once; every trial copy carries them
        if calibration is None:
            raise ValueError("the taylor importance needs calibration images and labels")
        source = copy.deepcopy(model)
        _gradients(source, calibration)
    lo, hi = 0.0, 0.95
    best = None
    for _ in range(30):
        mid = (lo + hi) / 2
        candidate = prune_once(_copy_with_gradients(source), mid, importance, global_pruning, calibration,
                               isomorphic=isomorphic)
        if count_params(candidate) <= target:
            best, hi = candidate, mid
            if count_params(candidate) >= (1.0 - removed - tolerance) * before:
                break
        else:
            lo = mid
    if best is None:
        raise ValueError(f"cannot remove {removed:.0%} of the parameters of {model.name} by pruning channels")
    return best


def prune_to_widths(model: SplitModel, widths: dict[str, int], importance: str = "magnitude",
                    calibration: tuple[torch.Tensor, torch.Tensor] | None = None) -> SplitModel:
    """Remove channels from ``model`` in place until each named convolution has the given
    number of output channels; return it.

    ``widths`` maps a convolution's module path (``blocks.4.conv1``) to its width. Each
    convolution is pruned with its whole dependency group (a residual stage's convolutions,
    batch norms, shortcut and the exit head reading it lose the same channels), so naming
    one convolution of a coupled group sets the group. Within the group the channels with
    the least ``importance`` go. This is the by-hand allocation that global ranking does not
    reach: on ``resnet_fm`` global magnitude keeps the 28x28 stage 3 channels wide, where a
    channel costs few parameters and many MACs."""
    tp = _tp()
    modules = dict(model.named_modules())
    for name, width in widths.items():
        layer = modules.get(name)
        if not isinstance(layer, nn.Conv2d):
            raise ValueError(f"widths: {name!r} is not a convolution of {model.name}")
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise ValueError(f"widths: {name} must be a whole number of channels of at least 1, not {width!r}")
        if width > layer.out_channels:
            raise ValueError(f"widths: {name} has {layer.out_channels} output channels; cannot widen it to {width}")
    if importance == "taylor":  # always fresh: a student straight from training holds its last batch's
        if calibration is None:
            raise ValueError("the taylor importance needs calibration images and labels")
        _gradients(model, calibration)
    scorer = _importance(importance)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = tp.DependencyGraph().build_dependency(
            model, torch.zeros(2, *model.input_shape), forward_fn=_all_outputs, output_transform=_sum_outputs,
            verbose=False)
        _check_groups_agree(graph, modules, widths)
        for name, width in widths.items():
            layer = modules[name]
            surplus = layer.out_channels - width
            if surplus <= 0:  # already that narrow (another member of its group set it)
                continue
            whole = graph.get_pruning_group(layer, tp.prune_conv_out_channels, list(range(layer.out_channels)))
            scores = scorer(whole)
            weakest = torch.argsort(scores)[:surplus].tolist()
            graph.get_pruning_group(layer, tp.prune_conv_out_channels, weakest).prune()
    model.zero_grad(set_to_none=True)
    model._cuts = None
    return model


def _check_groups_agree(graph, modules: dict[str, nn.Module], widths: dict[str, int]) -> None:
    """Refuse, before anything is pruned, two entries of ``widths`` that name convolutions of
    one coupled group with different widths (the model would be left half pruned)."""
    tp = _tp()
    seen: dict[frozenset[int], tuple[str, int]] = {}
    for name, width in widths.items():
        layer = modules[name]
        group = graph.get_pruning_group(layer, tp.prune_conv_out_channels, list(range(layer.out_channels)))
        members = frozenset(id(item.dep.target.module) for item in group.items
                            if item.dep.handler == tp.prune_conv_out_channels)
        other = seen.setdefault(members, (name, width))
        if other[1] != width:
            raise ValueError(f"widths: {other[0]} = {other[1]} and {name} = {width} are one coupled group "
                             "(they lose the same channels): two entries of one group disagree")


def interpolated_widths(model: nn.Module, widths: dict[str, int], fraction: float) -> dict[str, int]:
    """Widths ``fraction`` of the way from ``model``'s to ``widths``, geometrically (one step
    of an iterative prune to hand-set widths; 1.0 gives ``widths``)."""
    modules = dict(model.named_modules())
    out = {}
    for name, width in widths.items():
        now = getattr(modules.get(name), "out_channels", None)
        if now is None:
            raise ValueError(f"widths: {name!r} is not a convolution of the model")
        out[name] = width if fraction >= 1.0 else max(width, min(now, round(now * (width / now) ** fraction)))
    return out


@torch.no_grad()
def adapt_bn(model: nn.Module, images: torch.Tensor, batch_size: int = 256, batches: int = 20) -> nn.Module:
    """Re-estimate every batch norm's running statistics on ``images`` (adaptive BN)."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    was_training = model.training
    model.train()
    forward = getattr(model, "forward_exits", model)
    for b in range(batches):
        chunk = images[b * batch_size : (b + 1) * batch_size]
        if len(chunk) == 0:
            break
        forward(chunk)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)
    return model


def sweep(model: SplitModel, rates: list[float], evaluate: Callable[[SplitModel], float], images: torch.Tensor,
          importance: str = "magnitude", global_pruning: bool = True,
          calibration: tuple[torch.Tensor, torch.Tensor] | None = None, *,
          isomorphic: bool = False) -> list[dict]:
    """One-shot pruning at each rate (fraction of parameters removed), adaptive BN, then
    ``evaluate`` (on the validation split): the accuracy-versus-rate curve."""
    points = []
    for rate in rates:
        pruned = (prune_to(model, rate, importance, global_pruning, calibration, isomorphic=isomorphic)
                  if rate > 0 else copy.deepcopy(model))
        if rate > 0:
            adapt_bn(pruned, images)
        pruned.eval()
        points.append({"removed": round(1 - count_params(pruned) / count_params(model), 4),
                       "params": count_params(pruned), "accuracy": evaluate(pruned)})
    return points


def knee(xs: list[float], ys: list[float]) -> int:
    """Index of the knee of a curve (Kneedle, Satopaa et al. 2011): after normalising both
    axes to [0, 1], the point furthest above the chord from the first point to the last."""
    if len(xs) != len(ys) or len(xs) < 3:
        raise ValueError("the knee needs at least three points, as many x as y")
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0 or y1 == y0:
        return len(xs) - 1  # a flat curve: no knee before the end
    xn = [(x - x0) / (x1 - x0) for x in xs]
    yn = [(y - y0) / (y1 - y0) for y in ys]
    first, last = yn[0], yn[-1]
    gaps = [y - (first + (last - first) * x) for x, y in zip(xn, yn)]
    return max(range(len(gaps)), key=lambda i: gaps[i])

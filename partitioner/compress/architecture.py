"""Record and rebuild the layer shapes of a structurally changed model.

A pruned model's state dict does not fit the zoo class it came from: its convolutions,
batch norms and linear layers have fewer channels. :func:`layer_shapes` records, per
layer, the channel counts; :func:`rebuild` takes a freshly built zoo model and replaces
each recorded layer by one of the recorded size (same kernel, stride, padding, bias), so
the weights load. The record is plain JSON and goes into a bundle's manifest.

Example::

    >>> from edgesplit.models import build_model
    >>> model = build_model("resnet_fm")
    >>> shapes = layer_shapes(model)
    >>> shapes["blocks.1.conv1"]
    {'type': 'Conv2d', 'in': 16, 'out': 16}
    >>> rebuild(build_model("resnet_fm"), shapes).blocks[1].conv1.out_channels
    16
"""

from __future__ import annotations

from torch import nn

_KINDS = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)


def layer_shapes(model: nn.Module) -> dict[str, dict]:
    """Channel counts of every convolution, batch norm and linear layer, by module name."""
    shapes: dict[str, dict] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            shapes[name] = {"type": "Conv2d", "in": module.in_channels, "out": module.out_channels}
            if module.groups != 1:
                shapes[name]["groups"] = module.groups
        elif isinstance(module, nn.BatchNorm2d):
            shapes[name] = {"type": "BatchNorm2d", "features": module.num_features}
        elif isinstance(module, nn.Linear):
            shapes[name] = {"type": "Linear", "in": module.in_features, "out": module.out_features}
    return shapes


def _check_not_larger(name: str, spec: dict, now: dict) -> None:
    """Pruning only removes channels: a record larger than the base model is refused, so a
    hostile manifest cannot make loading allocate without bound."""
    for key in ("in", "out", "features"):
        if key in spec:
            value = spec[key]
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= now[key]:
                raise ValueError(f"layer {name}: {key} = {value!r} must be an integer in 1..{now[key]}")


def _resized(module: nn.Module, spec: dict) -> nn.Module:
    kind = spec.get("type")
    if isinstance(module, nn.Conv2d) and kind == "Conv2d":
        return nn.Conv2d(int(spec["in"]), int(spec["out"]), module.kernel_size, module.stride, module.padding,
                         module.dilation, int(spec.get("groups", module.groups)), module.bias is not None,
                         module.padding_mode)
    if isinstance(module, nn.BatchNorm2d) and kind == "BatchNorm2d":
        return nn.BatchNorm2d(int(spec["features"]), module.eps, module.momentum, module.affine,
                              module.track_running_stats)
    if isinstance(module, nn.Linear) and kind == "Linear":
        return nn.Linear(int(spec["in"]), int(spec["out"]), module.bias is not None)
    raise ValueError(f"layer {type(module).__name__} cannot take the recorded shape {spec}")


def rebuild(model: nn.Module, shapes: dict[str, dict]) -> nn.Module:
    """Resize ``model``'s layers in place to ``shapes`` (from :func:`layer_shapes`); return it.

    Refuses a record that names a layer the model lacks, or misses one it has, so a record
    from another architecture never half-applies."""
    modules = dict(model.named_modules())
    own = {n for n, m in modules.items() if isinstance(m, _KINDS)}
    if set(shapes) != own:
        missing, extra = sorted(own - set(shapes)), sorted(set(shapes) - own)
        raise ValueError(f"layer record does not match {type(model).__name__}: "
                         f"missing {missing[:5]}, unknown {extra[:5]}")
    current = layer_shapes(model)
    for name, spec in shapes.items():
        if not isinstance(spec, dict):
            raise ValueError(f"layer {name}: the record must be an object, not {spec!r}")
        _check_not_larger(name, spec, current[name])
    for name, spec in shapes.items():
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, attr, _resized(modules[name], spec))
    if hasattr(model, "_cuts"):
        model._cuts = None  # crossing shapes change with the channels
    return model

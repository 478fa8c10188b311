"""Int8 post-training static quantization of split-model segments, behind one interface.

:class:`Int8Backend` is the only place that touches the quantization API. The backend
here is ``torch.ao`` FX graph mode (per-channel int8 weights, calibrated activation ranges,
batch norms folded), with the ``x86`` engine on this machine and ``qnnpack`` for ARM; when
torch's quantization moves (to ``torchao``'s PT2E flow), a new backend replaces this one
and nothing else changes. torch's deprecation notices are caught here, not printed.

A quantized segment is saved as safetensors — int8 weights with their scales and zero
points, activation ranges — never pickled; loading rebuilds the float segment, converts it
with the same engine, and loads that state, so the quantized module is identical.

Example::

    >>> import torch
    >>> from edgesplit.models import build_model
    >>> model = build_model("resnet_fm").eval()
    >>> q = quantize_segment(model, 0, 4, torch.randn(64, 1, 28, 28))
    >>> tuple(q.module(torch.zeros(1, 1, 28, 28)).shape)
    (1, 16, 28, 28)
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from edgesplit.models.split_model import SplitModel
from edgesplit.models.weights_io import write_safetensors

ENGINES = ("x86", "fbgemm", "qnnpack")


@contextlib.contextmanager
def _quiet():
    """torch.ao announces its own deprecation and observer notes on every call; users of
    edgesplit cannot act on them, so they are silenced here (and only here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao.*")
        warnings.filterwarnings("ignore", category=UserWarning, message=r".*quantized tensor creation.*")
        warnings.filterwarnings("ignore", category=UserWarning, message=r".*quant_min and quant_max.*")
        yield


class Int8Backend:
    """Post-training static quantization with torch.ao's FX graph mode."""

    name = "torch.ao.fx"

    def __init__(self, engine: str = "x86") -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
        if engine not in torch.backends.quantized.supported_engines:
            raise RuntimeError(f"this torch build has no {engine} quantized engine "
                               f"(it has {torch.backends.quantized.supported_engines})")
        self.engine = engine

    def _prepare(self, module: nn.Module, example: torch.Tensor) -> nn.Module:
        with _quiet():
            from torch.ao.quantization import get_default_qconfig_mapping
            from torch.ao.quantization.quantize_fx import prepare_fx

            torch.backends.quantized.engine = self.engine
            return prepare_fx(module.eval(), get_default_qconfig_mapping(self.engine), (example,))

    def _convert(self, prepared: nn.Module) -> nn.Module:
        with _quiet():
            from torch.ao.quantization.quantize_fx import convert_fx

            return convert_fx(prepared)

    @torch.no_grad()
    def quantize(self, module: nn.Module, calibration: torch.Tensor, batch_size: int = 250) -> nn.Module:
        """A quantized copy of the float ``module``, its activation ranges observed on ``calibration``."""
        import copy

        prepared = self._prepare(copy.deepcopy(module), calibration[:1])
        with _quiet():
            for s in range(0, len(calibration), batch_size):
                prepared(calibration[s : s + batch_size])
        return self._convert(prepared)

    @torch.no_grad()
    def rebuild(self, module: nn.Module, example: torch.Tensor, state: dict) -> nn.Module:
        """The quantized module of ``module``'s architecture holding ``state``."""
        import copy

        prepared = self._prepare(copy.deepcopy(module), example)
        with _quiet():
            prepared(example)
        converted = self._convert(prepared)
        with _quiet():
            converted.load_state_dict(state)
        return converted

    def run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        torch.backends.quantized.engine = self.engine
        with _quiet():
            return module(x)


def flatten_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A quantized state dict as plain tensors plus a JSON layout that restores it."""
    tensors: dict[str, torch.Tensor] = {}
    layout: dict = {}

    def put(key: str, value):
        if isinstance(value, torch.Tensor) and value.is_quantized:
            tensors[f"{key}#int"] = value.int_repr().contiguous()
            if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                tensors[f"{key}#scales"] = value.q_per_channel_scales().contiguous()
                tensors[f"{key}#zero_points"] = value.q_per_channel_zero_points().contiguous()
                return {"kind": "per_channel", "axis": value.q_per_channel_axis(), "dtype": str(value.dtype)}
            return {"kind": "per_tensor", "scale": value.q_scale(), "zero_point": value.q_zero_point(),
                    "dtype": str(value.dtype)}
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().contiguous().clone()
            return {"kind": "tensor"}
        if isinstance(value, torch.dtype):
            return {"kind": "dtype", "value": str(value)}
        if isinstance(value, tuple):
            return {"kind": "tuple", "items": [put(f"{key}#{i}", v) for i, v in enumerate(value)]}
        if value is None:
            return {"kind": "none"}
        raise TypeError(f"cannot store {key} of type {type(value).__name__}")

    for key, value in state.items():
        layout[key] = put(key, value)
    # the per-module format versions: quantized modules read their state by version
    versions = getattr(state, "_metadata", None)
    if versions is not None:
        layout["#versions"] = {k: dict(v) for k, v in versions.items()}
    return tensors, layout


_DTYPES = {"torch.qint8": torch.qint8, "torch.quint8": torch.quint8, "torch.qint32": torch.qint32,
           "torch.float32": torch.float32, "torch.float16": torch.float16}


def unflatten_state(tensors: dict[str, torch.Tensor], layout: dict) -> dict:
    """The inverse of :func:`flatten_state`."""

    def get(key: str, spec: dict):
        kind = spec.get("kind")
        if kind == "tensor":
            return tensors[key]
        if kind == "per_channel":
            scales = tensors[f"{key}#scales"]
            if not (torch.isfinite(scales).all() and (scales > 0).all()):
                raise ValueError(f"{key}: scales must be finite and positive")
            return torch._make_per_channel_quantized_tensor(
                tensors[f"{key}#int"], scales, tensors[f"{key}#zero_points"], int(spec["axis"]))
        if kind == "per_tensor":
            scale = float(spec["scale"])
            if not (math.isfinite(scale) and scale > 0):
                raise ValueError(f"{key}: scale {scale} must be finite and positive")
            return torch._make_per_tensor_quantized_tensor(tensors[f"{key}#int"], scale, int(spec["zero_point"]))
        if kind == "dtype":
            return _DTYPES[spec["value"]]
        if kind == "tuple":
            return tuple(get(f"{key}#{i}", s) for i, s in enumerate(spec["items"]))
        if kind == "none":
            return None
        raise ValueError(f"unknown stored kind {kind!r} for {key}")

    from collections import OrderedDict

    state = OrderedDict((key, get(key, spec)) for key, spec in layout.items() if key != "#versions")
    if "#versions" in layout:
        state._metadata = OrderedDict((k, dict(v)) for k, v in layout["#versions"].items())
    return state


def segment(model: SplitModel, start: int, stop: int) -> nn.Sequential:
    """Blocks ``start..stop`` of ``model`` as one float module."""
    model.check_cut(start)
    model.check_cut(stop)
    if stop <= start:
        raise ValueError(f"a segment needs stop > start, not {start}..{stop}")
    return nn.Sequential(*model.blocks[start:stop]).eval()


@dataclass
class QuantizedSegment:
    """Blocks ``start..stop`` of a model, quantized to int8 for ``engine``."""

    module: nn.Module
    start: int
    stop: int
    backend: Int8Backend

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend.run(self.module, x)

    def save(self, path: str | Path) -> int:
        """Write the segment as safetensors; return its size in bytes."""
        tensors, layout = flatten_state(self.module.state_dict())
        meta = {"start": str(self.start), "stop": str(self.stop), "engine": self.backend.engine,
                "backend": self.backend.name, "layout": json.dumps(layout)}
        write_safetensors(tensors, path, metadata=meta)
        return Path(path).stat().st_size


def quantize_segment(model: SplitModel, start: int, stop: int, calibration: torch.Tensor,
                     engine: str = "x86") -> QuantizedSegment:
    """Quantize blocks ``start..stop``; ``calibration`` is what crosses cut ``start`` (images for 0)."""
    backend = Int8Backend(engine)
    return QuantizedSegment(backend.quantize(segment(model, start, stop), calibration), start, stop, backend)


def load_segment(model: SplitModel, path: str | Path) -> QuantizedSegment:
    """Load a quantized segment saved by :meth:`QuantizedSegment.save` for ``model``'s architecture."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None
    try:
        start, stop, engine = int(meta["start"]), int(meta["stop"]), meta["engine"]
        layout = json.loads(meta["layout"])
        if not isinstance(layout, dict) or not all(isinstance(v, dict) for v in layout.values()):
            raise ValueError("layout is not an object of tensor records")
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path} is not a quantized segment (its metadata: {exc})") from None
    backend = Int8Backend(engine)
    example = torch.zeros(1, *model.cut_points()[start].shape)
    try:
        with _quiet():
            state = unflatten_state(load_file(str(path)), layout)
        module = backend.rebuild(segment(model, start, stop), example, state)
        bad = next((k for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)
                    and v.is_floating_point() and not v.is_quantized and not torch.isfinite(v).all()), None)
        if bad is not None:
            raise ValueError(f"tensor {bad} holds NaN or Inf values")
    except (KeyError, IndexError, RuntimeError, TypeError, AttributeError, ValueError) as exc:
        raise ValueError(f"{path} does not hold blocks {start}..{stop} of {model.name}: {exc}") from None
    return QuantizedSegment(module, start, stop, backend)


def float_segment_bytes(model: SplitModel, start: int, stop: int, path: str | Path) -> int:
    """Size of the same segment's float32 weights as safetensors (written to ``path``)."""
    state = {k: v.detach().contiguous().clone() for k, v in segment(model, start, stop).state_dict().items()}
    write_safetensors(state, path)
    return Path(path).stat().st_size


def latency_ms(fn, x: torch.Tensor, repeats: int = 30) -> float:
    """Median wall time of ``fn(x)`` in milliseconds (after a warm-up call)."""
    from edgesplit.partitioner.profile import median_seconds

    with torch.inference_mode():
        return 1000 * median_seconds(lambda: fn(x), repeats)


def int8_bundle_segment(bundle) -> QuantizedSegment:
    """The quantized segment a bundle carries (see :func:`run_int8`)."""
    info = bundle.manifest.get("int8")
    if not info:
        raise ValueError(f"{bundle.path} carries no int8 segment")
    if not isinstance(info, dict):
        raise ValueError(f"{bundle.path}: the manifest's int8 section must be an object, not {type(info).__name__}")
    name = info.get("file")
    if not isinstance(name, str) or Path(name).name != name or name not in bundle.manifest.get("files", {}):
        raise ValueError(f"{bundle.path}: the int8 segment {name!r} is not a file the manifest lists and hashes")
    segment_ = load_segment(bundle.model, bundle.path / name)
    if (segment_.start, segment_.stop) != (info.get("start"), info.get("stop")):
        raise ValueError(f"{bundle.path / name}: blocks {segment_.start}..{segment_.stop}, the manifest says "
                         f"{info.get('start')}..{info.get('stop')}")
    if segment_.backend.engine != info.get("engine"):  # another engine's kernels compute other values
        raise ValueError(f"{bundle.path / name}: quantized for the {segment_.backend.engine} engine, the manifest "
                         f"says {info.get('engine')!r:.40}")
    return segment_


def run_int8(cfg, base: str, data, out: Path, progress: bool = True) -> dict:
    """Quantize the whole chain of the shipped model (calibrated on training images), measure
    it against float32, and write the bundle ``OUT/<base>_int8`` carrying the int8 segment."""
    import time

    from edgesplit.models import load_trained
    from edgesplit.partitioner.bundle import attach_file, write_bundle

    from .data import accuracy

    started = time.time()
    model = load_trained(base)
    stop = model.num_blocks
    q = quantize_segment(model, 0, stop, data.x[: cfg.calibration_images], cfg.engine)
    bundle = out / f"{base}_int8"
    write_bundle(model, bundle)
    name = f"int8-0-{stop}.safetensors"
    int8_bytes = q.save(bundle / name)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        fp32_bytes = float_segment_bytes(model, 0, stop, Path(tmp) / "fp32.safetensors")
    attach_file(bundle, name, "int8", {"file": name, "start": 0, "stop": stop, "engine": cfg.engine,
                                       "backend": q.backend.name, "bytes": int8_bytes, "fp32_bytes": fp32_bytes})
    acc_fp32 = accuracy(model, data.test_x, data.test_y)
    acc_int8 = accuracy(q, data.test_x, data.test_y)
    latency = {}
    for b in cfg.latency_batches:
        x = data.test_x[:b]
        latency[str(b)] = {"fp32_ms": round(latency_ms(model, x), 3), "int8_ms": round(latency_ms(q, x), 3)}
    return {"size_ratio": round(fp32_bytes / int8_bytes, 3), "fp32_bytes": fp32_bytes, "int8_bytes": int8_bytes,
            "acc_before": acc_fp32, "acc_after": acc_int8, "acc_drop_points": round((acc_fp32 - acc_int8) * 100, 2),
            "latency": latency, "torch_threads": torch.get_num_threads(), "engine": cfg.engine,
            "calibration_images": cfg.calibration_images, "train_seconds": round(time.time() - started, 1)}

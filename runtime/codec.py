"""Tensor codec: how crossing tensors travel between split-computing nodes.

A crossing tensor travels as one Open Inference Protocol ``raw_input_contents`` entry (raw
little-endian bytes) plus a datatype, a shape and a few parameters. :func:`encode` turns a
tensor into an :class:`EncodedTensor` under one of :data:`CODECS`, optionally zlib-compressed;
:func:`decode` turns untrusted bytes back into a float32 tensor, validating everything before
it allocates anything large; :func:`encoded_nbytes` gives the uncompressed wire size for the
cost model.

>>> import torch
>>> x = torch.linspace(-1.0, 1.0, 12).reshape(1, 3, 4)
>>> enc = encode(x, "int8", compression="zlib")
>>> enc.datatype, enc.shape, enc.params["codec"], enc.params["compression"]
('INT8', (1, 3, 4), 'int8', 'zlib')
>>> y = decode(enc.data, enc.datatype, enc.shape, enc.params)
>>> y.dtype, bool((y - x).abs().max() <= enc.params["scale"] / 2 + 1e-6)
(torch.float32, True)
>>> encoded_nbytes((1, 3, 4), "fp16"), encoded_nbytes((1, 3, 4), "int8-channel")
(24, 36)
"""

from __future__ import annotations

import base64
import itertools
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

CODECS: tuple[str, ...] = ("fp32", "fp16", "int8", "int8-channel")
COMPRESSIONS: tuple[str, ...] = ("none", "zlib")
MAX_ELEMENTS = 1 << 26  # default ceiling on decoded element count

_DATATYPE = {"fp32": "FP32", "fp16": "FP16", "int8": "INT8", "int8-channel": "INT8"}
_WIRE = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2"), "INT8": np.dtype("i1")}
_FP16_MAX = 65504.0
_F32_MAX = float(np.finfo(np.float32).max)
_MAX_NDIM = 32


class CodecError(ValueError):
    """Malformed tensor, payload or parameters; the message says what was wrong and expected."""


@dataclass(frozen=True)
class EncodedTensor:
    """One encoded tensor, ready to go into an Open Inference Protocol request."""

    data: bytes
    datatype: str
    shape: tuple[int, ...]
    codec: str
    params: dict[str, str | float | int]


def encode(
    tensor: torch.Tensor | np.ndarray, codec: str = "fp32", compression: str = "none"
) -> EncodedTensor:
    """Encode ``tensor`` under ``codec`` (one of CODECS) and ``compression`` (COMPRESSIONS)."""
    if codec not in CODECS:
        raise CodecError(f"unknown codec {_show(codec)}; expected one of {CODECS}")
    if compression not in COMPRESSIONS:
        raise CodecError(f"unknown compression {_show(compression)}; "
                         f"expected one of {COMPRESSIONS}")
    x = _as_float32(tensor)
    shape = _check_shape(x.shape, None)
    params: dict[str, str | float | int] = {"codec": codec}
    if codec != "fp32" and not np.isfinite(x).all():
        raise CodecError(f"codec {codec!r} cannot carry NaN or Inf; use 'fp32' for such tensors")
    if codec == "fp32":
        raw = x.astype("<f4").tobytes()
    elif codec == "fp16":
        peak = float(np.abs(x).max()) if x.size else 0.0
        if peak > _FP16_MAX:
            raise CodecError(f"value {peak:g} is beyond the fp16 range (|x| <= 65504); "
                             "use 'fp32' or an int8 codec")
        raw = x.astype("<f2").tobytes()
    elif codec == "int8":
        lo, hi = (x.min(), x.max()) if x.size else (0.0, 0.0)
        scale, zp = _affine(np.float64(lo), np.float64(hi))
        raw = _quantize(x, scale, zp).tobytes()
        params.update(scale=float(scale), zero_point=int(zp))
    else:
        if x.ndim < 2:
            raise CodecError(f"codec 'int8-channel' needs ndim >= 2 (channel axis 1), got {shape}")
        axes = tuple(i for i in range(x.ndim) if i != 1)
        empty = np.zeros(x.shape[1])
        lo, hi = (x.min(axis=axes), x.max(axis=axes)) if x.size else (empty, empty)
        scale, zp = _affine(lo.astype(np.float64), hi.astype(np.float64))
        bshape = (1, -1) + (1,) * (x.ndim - 2)
        raw = _quantize(x, scale.reshape(bshape), zp.reshape(bshape)).tobytes()
        params.update(scales=base64.b64encode(scale.astype("<f4").tobytes()).decode("ascii"),
                      zero_points=base64.b64encode(zp.astype("<i4").tobytes()).decode("ascii"),
                      axis=1)
    if compression == "zlib":
        raw = zlib.compress(raw)
        params["compression"] = "zlib"
    return EncodedTensor(raw, _DATATYPE[codec], shape, codec, params)


def decode(
    data: bytes,
    datatype: str,
    shape: Sequence[int],
    params: Mapping[str, object] | None = None,
    max_elements: int = MAX_ELEMENTS,
) -> torch.Tensor:
    """Decode an untrusted payload into a new contiguous float32 tensor of ``shape``."""
    return torch.from_numpy(decode_array(data, datatype, shape, params, max_elements))


def decode_array(
    data: bytes,
    datatype: str,
    shape: Sequence[int],
    params: Mapping[str, object] | None = None,
    max_elements: int = MAX_ELEMENTS,
) -> np.ndarray:
    """:func:`decode` to a new, writable, contiguous float32 numpy array (no torch call:
    what a server checks before handing the tensor to the model)."""
    params = {} if params is None else params
    if not isinstance(params, Mapping):
        raise CodecError(f"params must be a mapping, got {type(params).__name__}")
    if not isinstance(datatype, str) or datatype not in _WIRE:
        raise CodecError(f"unknown datatype {_show(datatype)}; expected one of {tuple(_WIRE)}")
    codec = params.get("codec")
    if codec is None:
        inferred = {"FP32": "fp32", "FP16": "fp16", "INT8": "int8"}[datatype]
        codec = "int8-channel" if datatype == "INT8" and "scales" in params else inferred
    if not isinstance(codec, str) or codec not in CODECS:
        raise CodecError(f"unknown codec {_show(codec)}; expected one of {CODECS}")
    if _DATATYPE[codec] != datatype:
        raise CodecError(f"datatype {datatype!r} does not match codec {codec!r}; "
                         f"expected {_DATATYPE[codec]!r}")
    if isinstance(max_elements, bool) or not isinstance(max_elements, int) or max_elements < 0:
        raise CodecError(f"max_elements must be a non-negative int, got {_show(max_elements)}")
    dims = _check_shape(shape, max_elements)
    compression = params.get("compression", "none")
    if not isinstance(compression, str) or compression not in COMPRESSIONS:
        raise CodecError(f"unknown compression {_show(compression)}; "
                         f"expected one of {COMPRESSIONS}")
    if codec == "int8":
        scale = _scales(np.array([_number(params.get("scale"), "scale")]), "scale")
        zp = _zero_points(np.array([_integer(params.get("zero_point"), "zero_point")]))
    elif codec == "int8-channel":
        if len(dims) < 2:
            raise CodecError(f"codec 'int8-channel' needs ndim >= 2 (channel axis 1), got {dims}")
        axis = params.get("axis", 1)
        if isinstance(axis, bool) or not isinstance(axis, int | np.integer | str) \
                or axis not in (1, "1"):
            raise CodecError(f"axis must be 1 for codec 'int8-channel', got {_show(axis)}")
        channels = dims[1]
        scale = _scales(_side(params.get("scales"), "scales", "<f4", channels), "scales")
        zp = _zero_points(_side(params.get("zero_points"), "zero_points", "<i4", channels))
    try:
        buf = memoryview(data).cast("B")
    except (TypeError, ValueError) as exc:
        raise CodecError(f"data must be contiguous bytes, got {type(data).__name__}") from exc
    count = math.prod(dims)
    nbytes = count * _WIRE[datatype].itemsize
    raw = _inflate(buf, nbytes) if compression == "zlib" else buf
    if len(raw) != nbytes:
        raise CodecError(f"payload has {len(raw)} bytes; shape {list(dims)} of {datatype} "
                         f"needs exactly {nbytes}")
    out = np.frombuffer(raw, dtype=_WIRE[datatype], count=count).astype(np.float32)
    if codec.startswith("int8"):
        bshape = (1, -1) + (1,) * (len(dims) - 2) if codec == "int8-channel" else (1,)
        out = out.reshape(dims if codec == "int8-channel" else (-1,))
        out -= zp.astype(np.float32).reshape(bshape)
        with np.errstate(over="ignore"):
            out *= scale.reshape(bshape)
        if float(scale.max(initial=0.0)) * 255.0 > _F32_MAX:  # saturate instead of overflowing
            np.clip(out, -_F32_MAX, _F32_MAX, out=out)
    return out.reshape(dims)


def encoded_nbytes(shape: Sequence[int], codec: str) -> int:
    """Uncompressed wire bytes of a ``shape`` tensor under ``codec``, side data included."""
    if codec not in CODECS:
        raise CodecError(f"unknown codec {_show(codec)}; expected one of {CODECS}")
    dims = _check_shape(shape, None)
    size = math.prod(dims) * _WIRE[_DATATYPE[codec]].itemsize
    if codec == "int8-channel":
        if len(dims) < 2:
            raise CodecError(f"codec 'int8-channel' needs ndim >= 2 (channel axis 1), got {dims}")
        size += dims[1] * 8  # one float32 scale and one int32 zero point per channel
    return size


def payload_size_problem(
    nbytes: int, datatype: str, shape: Sequence[int], params: Mapping[str, object]
) -> str | None:
    """Why ``nbytes`` of payload cannot hold a ``shape`` tensor of ``datatype`` (None if it can):
    uncompressed, the size must be exact; zlib-compressed, within zlib's worst case. A cheap
    check for before the payload is queued; :func:`decode` checks everything again."""
    wire = _WIRE.get(datatype)
    if wire is None:
        return None  # an unknown datatype is refused elsewhere, with its own message
    expected = math.prod(shape) * wire.itemsize
    if params.get("compression", "none") == "zlib":
        if nbytes > expected + expected // 1000 + 64:
            return f"{nbytes} compressed bytes for {expected} uncompressed; that is more than zlib ever makes"
        return None
    if nbytes != expected:
        return f"payload has {nbytes} bytes; shape {list(shape)[:8]} of {datatype} needs exactly {expected}"
    return None


def _as_float32(tensor: object) -> np.ndarray:
    if isinstance(tensor, torch.Tensor):
        if tensor.is_complex():
            raise CodecError(f"complex tensors are not supported, got {tensor.dtype}")
        return tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
    if isinstance(tensor, np.ndarray):
        if tensor.dtype.kind not in "biuf":
            raise CodecError(f"array dtype {tensor.dtype} is not supported; expected real numbers")
        with np.errstate(over="ignore"):
            return tensor.astype(np.float32)
    raise CodecError(f"expected a torch.Tensor or numpy.ndarray, got {type(tensor).__name__}")


def _show(value: object) -> str:
    """A short repr of an untrusted value for error messages (never raises)."""
    try:
        text = repr(value)
    except Exception:  # e.g. ints too long to print
        return f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def _check_shape(shape: object, max_elements: int | None) -> tuple[int, ...]:
    if isinstance(shape, str | bytes | bytearray | Mapping) or not hasattr(shape, "__iter__"):
        raise CodecError(f"shape must be a sequence of ints, got {type(shape).__name__}")
    dims = list(itertools.islice(shape, _MAX_NDIM + 1))
    if len(dims) > _MAX_NDIM:
        raise CodecError(f"shape has more than {_MAX_NDIM} dimensions")
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int | np.integer) or d < 0:
            raise CodecError(f"shape has dimension {_show(d)}; expected non-negative ints")
    out = tuple(int(d) for d in dims)
    if max_elements is not None and math.prod(max(d, 1) for d in out) > max_elements:
        raise CodecError(f"shape {_show(list(out))} holds more than max_elements={max_elements} "
                         "elements (zero-length dimensions counted as 1)")
    return out


def _affine(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32, > 0, 255 * scale covers the range) and zero point of [lo, hi] U {0}."""
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    span = hi - lo
    scale = np.asarray(span / 255.0).astype(np.float32)
    scale = np.where(scale.astype(np.float64) * 255.0 < span,
                     np.nextafter(scale, np.float32(np.inf)), scale)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    zp = np.clip(-128.0 - np.floor(lo / scale + 0.5), -128, 127).astype(np.int32)
    return scale, zp


def _quantize(x: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> np.ndarray:
    q = np.floor(x.astype(np.float64) / scale.astype(np.float64) + 0.5) + zp
    return np.clip(q, -128, 127).astype(np.int8)


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str | np.number):
        raise CodecError(f"{name} is {_show(value)}; expected a positive finite number")
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError(f"{name} is {_show(value)}; expected a positive finite number") from exc


def _integer(value: object, name: str) -> int:
    if isinstance(value, float | np.floating) and float(value).is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | str | np.integer):
        raise CodecError(f"{name} is {_show(value)}; expected an integer in [-128, 127]")
    try:
        return int(value)
    except ValueError as exc:
        raise CodecError(f"{name} is {_show(value)}; expected an integer in [-128, 127]") from exc


def _scales(values: np.ndarray, name: str) -> np.ndarray:
    ok = np.isfinite(values) & (values > 0) & (values <= _F32_MAX)
    if not ok.all():
        raise CodecError(f"{name} {_show(values[~ok][:4].tolist())} invalid; "
                         "expected finite float32 > 0")
    scale = values.astype(np.float32)
    if not (scale > 0).all():
        raise CodecError(f"{name} underflows float32; expected a positive float32 scale")
    return scale


def _zero_points(values: np.ndarray) -> np.ndarray:
    bad = (values < -128) | (values > 127)
    if bad.any():
        raise CodecError(f"zero point {_show(values[bad][:4].tolist())} outside [-128, 127]")
    return values.astype(np.int32)


def _side(value: object, name: str, dtype: str, channels: int) -> np.ndarray:
    """Decode base64 per-channel side data, checking its length before decoding."""
    nbytes = channels * 4
    if isinstance(value, str | bytes) and len(value) == 4 * math.ceil(nbytes / 3):
        try:
            raw = base64.b64decode(value, validate=True)
        except ValueError as exc:
            raise CodecError(f"{name} is not valid base64: {exc}") from exc
        if len(raw) == nbytes:
            return np.frombuffer(raw, dtype=dtype).astype(np.float64)
    raise CodecError(f"{name} must be base64 of {channels} little-endian {dtype[1:]} values "
                     f"(one per channel of axis 1), got {_show(value)}")


def _inflate(data: memoryview, nbytes: int) -> bytes:
    """zlib-inflate at most ``nbytes + 1`` bytes: one more than expected proves a bomb."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, nbytes + 1)
    except zlib.error as exc:
        raise CodecError(f"zlib payload is corrupt: {exc}") from exc
    if len(out) > nbytes:
        raise CodecError(f"zlib payload inflates to more than the expected {nbytes} bytes")
    if len(out) == nbytes and not inflater.eof:
        raise CodecError(f"zlib payload is truncated after {nbytes} bytes (no end of stream)")
    if inflater.unused_data:
        raise CodecError(f"zlib payload has {len(inflater.unused_data)} trailing bytes")
    return out


def seconds_per_element(codec: str = "int8", elements: int = 1 << 18, repeats: int = 5) -> tuple[float, float]:
    """Median seconds per element to encode and to decode a ``codec`` tensor on this host.

    The partitioner's cost model charges them per crossing element (encoding on the
    device, decoding on the edge): a slow device can spend more time quantising a large
    tensor than the link takes to carry it.
    """
    import statistics
    import time

    x = torch.randn(elements)
    enc_times, dec_times = [], []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        enc = encode(x, codec)
        encoded = time.perf_counter()
        decode(enc.data, enc.datatype, enc.shape, enc.params)
        enc_times.append(encoded - started)
        dec_times.append(time.perf_counter() - encoded)
    return statistics.median(enc_times[1:]) / elements, statistics.median(dec_times[1:]) / elements

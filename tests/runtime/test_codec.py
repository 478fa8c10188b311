"""Tests for edgesplit.runtime.codec: round trips, sizes, and hostile payloads."""

from __future__ import annotations

import base64
import doctest
import time
import tracemalloc
import warnings
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgesplit.runtime import codec as codec_module
from edgesplit.runtime.codec import (
    CODECS,
    COMPRESSIONS,
    MAX_ELEMENTS,
    CodecError,
    EncodedTensor,
    decode,
    encode,
    encoded_nbytes,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TINY = float(np.finfo(np.float32).smallest_subnormal)


def tensors(min_dims: int = 0, bound: float | None = None) -> st.SearchStrategy[np.ndarray]:
    """Small float32 arrays: random values (finite, optionally bounded) or constant fills."""
    shapes = hnp.array_shapes(min_dims=min_dims, max_dims=4, min_side=0, max_side=5)
    values = st.floats(width=32, allow_nan=False, allow_infinity=False,
                       min_value=None if bound is None else -bound,
                       max_value=None if bound is None else bound)
    random = hnp.arrays(np.float32, shapes, elements=values)
    constant = st.builds(lambda s, v: np.full(s, v, dtype=np.float32), shapes, values)
    return st.one_of(random, constant)


def roundtrip(x: np.ndarray, name: str, compression: str) -> tuple[EncodedTensor, np.ndarray]:
    enc = encode(x, name, compression)
    assert enc.codec == name and enc.params["codec"] == name and enc.shape == x.shape
    assert ("compression" in enc.params) == (compression != "none")
    y = decode(enc.data, enc.datatype, enc.shape, enc.params)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32 and y.is_contiguous()
    assert tuple(y.shape) == x.shape
    return enc, y.numpy().astype(np.float64)


def side(enc: EncodedTensor, key: str, dtype: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(enc.params[key]), dtype=dtype)


# --- round trips -------------------------------------------------------------------------


@FAST
@given(tensors(), st.sampled_from(COMPRESSIONS))
def test_fp32_is_exact(x, compression):
    enc, y = roundtrip(x, "fp32", compression)
    assert enc.datatype == "FP32"
    np.testing.assert_array_equal(y, x)


@FAST
@given(tensors(bound=65504.0), st.sampled_from(COMPRESSIONS))
def test_fp16_within_half_ulp(x, compression):
    enc, y = roundtrip(x, "fp16", compression)
    assert enc.datatype == "FP16"
    x64 = x.astype(np.float64)
    assert np.all(np.abs(y - x64) <= np.maximum(np.abs(x64) * 2.0**-11, 2.0**-24))


@FAST
@given(tensors(), st.sampled_from(COMPRESSIONS))
def test_int8_within_half_scale(x, compression):
    enc, y = roundtrip(x, "int8", compression)
    scale, zp = enc.params["scale"], enc.params["zero_point"]
    assert enc.datatype == "INT8" and isinstance(scale, float) and isinstance(zp, int)
    assert scale > 0 and -128 <= zp <= 127
    x64 = x.astype(np.float64)
    assert np.all(np.abs(y - x64) <= scale / 2 * (1 + 1e-6) + np.abs(x64) * 2.0**-23 + TINY)


@FAST
@given(tensors(min_dims=2), st.sampled_from(COMPRESSIONS))
def test_int8_channel_within_half_scale(x, compression):
    enc, y = roundtrip(x, "int8-channel", compression)
    assert enc.datatype == "INT8" and enc.params["axis"] == 1
    scales, zps = side(enc, "scales", "<f4"), side(enc, "zero_points", "<i4")
    assert scales.shape == zps.shape == (x.shape[1],)
    assert np.all(scales > 0) and np.all((zps >= -128) & (zps <= 127))
    bound = scales.astype(np.float64).reshape((1, -1) + (1,) * (x.ndim - 2)) / 2
    x64 = x.astype(np.float64)
    assert np.all(np.abs(y - x64) <= bound * (1 + 1e-6) + np.abs(x64) * 2.0**-23 + TINY)


def test_constant_and_extreme_tensors():
    for value in (0.0, 5.0, -3.0, 1e-45, 3.4e38):
        x = np.full((2, 3, 2), value, dtype=np.float32)
        for name in ("int8", "int8-channel"):
            _, y = roundtrip(x, name, "none")
            assert np.all(np.isfinite(y))
    x = np.array([[-3.4028235e38, 3.4028235e38]], dtype=np.float32)
    _, y = roundtrip(x, "int8", "zlib")
    np.testing.assert_allclose(y, x, rtol=1e-2)


def test_accepts_torch_inputs_of_any_layout_and_dtype():
    base = torch.randn(2, 3, 4, requires_grad=True)
    for t in (base, base.transpose(1, 2), base.to(torch.float64), base.to(torch.bfloat16)):
        enc, y = roundtrip(t, "fp32", "none")
        np.testing.assert_array_equal(y, t.detach().float().numpy())
    big_endian = np.arange(6, dtype=">f4").reshape(2, 3)
    np.testing.assert_array_equal(roundtrip(big_endian, "fp32", "zlib")[1], big_endian)


def test_decoded_tensor_is_a_writable_copy():
    enc = encode(torch.ones(2, 2))
    y = decode(enc.data, enc.datatype, enc.shape, enc.params)
    y += 1
    assert torch.equal(decode(enc.data, enc.datatype, enc.shape, enc.params), torch.ones(2, 2))


def test_codec_inferred_from_datatype():
    x = torch.randn(2, 3)
    for name in ("fp32", "fp16"):
        enc = encode(x, name)
        params = {k: v for k, v in enc.params.items() if k != "codec"}
        assert torch.equal(decode(enc.data, enc.datatype, enc.shape, params),
                           decode(enc.data, enc.datatype, enc.shape, enc.params))
    enc = encode(x, "int8")
    bare = {"scale": enc.params["scale"], "zero_point": enc.params["zero_point"]}
    assert torch.equal(decode(enc.data, "INT8", enc.shape, bare), decode(*_wire(enc)))
    with pytest.raises(CodecError, match="scale"):
        decode(enc.data, "INT8", enc.shape)


def test_fp32_passes_nan_and_inf_through():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0])
    y = decode(*_wire(encode(x, "fp32")))
    assert torch.isnan(y[0]) and y[1] == float("inf") and y[2] == -float("inf") and y[3] == 1


def test_module_doctest():
    assert doctest.testmod(codec_module).failed == 0


# --- encode errors -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fp16", "int8", "int8-channel"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rejected_by_lossy_codecs(name, bad):
    with pytest.raises(CodecError, match="NaN or Inf"):
        encode(torch.tensor([[1.0, bad]]), name)


def test_fp16_overflow_rejected():
    encode(torch.tensor([65504.0, -65504.0]), "fp16")
    with pytest.raises(CodecError, match="fp16 range"):
        encode(torch.tensor([1.0, -70000.0]), "fp16")


def test_encode_argument_errors():
    with pytest.raises(CodecError, match="unknown codec"):
        encode(torch.ones(2), "int4")
    with pytest.raises(CodecError, match="unknown compression"):
        encode(torch.ones(2), "fp32", "gzip")
    with pytest.raises(CodecError, match="ndim >= 2"):
        encode(torch.ones(4), "int8-channel")
    with pytest.raises(CodecError, match="complex"):
        encode(torch.ones(2, dtype=torch.complex64))
    with pytest.raises(CodecError, match="torch.Tensor or numpy.ndarray"):
        encode([1.0, 2.0])


# --- sizes -------------------------------------------------------------------------------


@FAST
@given(tensors(min_dims=2), st.sampled_from(CODECS))
def test_encoded_nbytes_matches_payload(x, name):
    if name == "fp16":
        x = np.clip(x, -65504, 65504)
    enc = encode(x, name)
    expected = len(enc.data)
    if name == "int8-channel":
        expected += len(base64.b64decode(enc.params["scales"]))
        expected += len(base64.b64decode(enc.params["zero_points"]))
    assert encoded_nbytes(x.shape, name) == expected


def test_encoded_nbytes_values_and_errors():
    assert encoded_nbytes((1, 64, 8, 8), "fp32") == 16384
    assert encoded_nbytes((1, 64, 8, 8), "int8-channel") == 4096 + 64 * 8
    assert encoded_nbytes([1 << 40, 1 << 40], "int8") == 1 << 80  # pure arithmetic
    for shape, name in (((2, 3), "bf16"), ((4,), "int8-channel"), ((-1, 2), "fp32")):
        with pytest.raises(CodecError):
            encoded_nbytes(shape, name)


# --- malformed payloads ------------------------------------------------------------------


def _wire(enc: EncodedTensor) -> tuple[bytes, str, tuple[int, ...], dict]:
    return enc.data, enc.datatype, enc.shape, dict(enc.params)


def _with(enc: EncodedTensor, **changes) -> dict:
    params = dict(enc.params)
    for key, value in changes.items():
        if value is None:
            params.pop(key, None)
        else:
            params[key] = value
    return params


def _b64(values, dtype: str) -> str:
    return base64.b64encode(np.asarray(values, dtype=dtype).tobytes()).decode()


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("delta", [-1, 1])
def test_wrong_byte_count_rejected(name, delta):
    data, datatype, shape, params = _wire(encode(torch.randn(2, 3, 2), name))
    bad = data[:delta] if delta < 0 else data + b"\0"
    with pytest.raises(CodecError, match="needs exactly"):
        decode(bad, datatype, shape, params)


@pytest.mark.parametrize(
    "datatype, params, match",
    [
        ("BF16", {}, "unknown datatype"),
        ("fp32", {}, "unknown datatype"),
        (None, {}, "unknown datatype"),
        ("FP32", {"codec": "fp8"}, "unknown codec"),
        ("FP32", {"codec": 3}, "unknown codec"),
        ("FP32", {"codec": "fp16"}, "does not match"),
        ("INT8", {"codec": "fp32"}, "does not match"),
        ("FP32", {"compression": "gzip"}, "unknown compression"),
        ("FP32", [("codec", "fp32")], "mapping"),
    ],
)
def test_unknown_or_mismatched_names_rejected(datatype, params, match):
    with pytest.raises(CodecError, match=match):
        decode(bytes(24), datatype, [2, 3], params)


@pytest.mark.parametrize(
    "shape",
    [[1 << 40, 1 << 40], [0, 1 << 70], [-1, 4], [2, -3], [2.0, 3], ["2", 3], [True, 2], "23",
     None, 7, [1] * 40, {"a": 1}],
)
def test_bad_or_absurd_shapes_rejected_without_allocating(shape):
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(CodecError, match="shape|dimension"):
            decode(bytes(16), "FP32", shape)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 1.0 and peak < 1 << 20


def test_max_elements_is_enforced():
    decode(bytes(16), "FP32", [2, 2], max_elements=4)
    with pytest.raises(CodecError, match="max_elements"):
        decode(bytes(16), "FP32", [2, 2], max_elements=3)
    with pytest.raises(CodecError, match="max_elements"):
        decode(bytes(16), "FP32", [MAX_ELEMENTS + 1])
    with pytest.raises(CodecError, match="max_elements"):
        decode(bytes(16), "FP32", [2, 2], max_elements=-1)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"scale": None}, "scale"),
        ({"scale": "abc"}, "scale"),
        ({"scale": float("nan")}, "scale"),
        ({"scale": float("inf")}, "scale"),
        ({"scale": 0.0}, "scale"),
        ({"scale": -0.5}, "scale"),
        ({"scale": 1e300}, "scale"),
        ({"scale": 1e-300}, "scale"),
        ({"scale": True}, "scale"),
        ({"scale": [1.0]}, "scale"),
        ({"zero_point": None}, "zero_point"),
        ({"zero_point": 128}, r"\[-128, 127\]"),
        ({"zero_point": -129}, r"\[-128, 127\]"),
        ({"zero_point": 1.5}, "zero_point"),
        ({"zero_point": "x"}, "zero_point"),
        ({"compression": "lz4"}, "compression"),
    ],
)
def test_bad_int8_params_rejected(changes, match):
    enc = encode(torch.randn(2, 3), "int8")
    with pytest.raises(CodecError, match=match):
        decode(enc.data, enc.datatype, enc.shape, _with(enc, **changes))


def test_int8_params_accept_wire_spellings():
    enc = encode(torch.randn(2, 3), "int8")
    want = decode(*_wire(enc))
    spelled = _with(enc, scale=str(enc.params["scale"]), zero_point=float(enc.params["zero_point"]))
    assert torch.equal(decode(enc.data, enc.datatype, enc.shape, spelled), want)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"scales": None}, "scales"),
        ({"scales": _b64([1.0, 1.0], "<f4")}, "3 little-endian"),
        ({"scales": _b64([1.0] * 4, "<f4")}, "3 little-endian"),
        ({"scales": "!!!!" * 4}, "base64"),
        ({"scales": 12}, "scales"),
        ({"scales": _b64([1.0, float("nan"), 1.0], "<f4")}, "scales"),
        ({"scales": _b64([1.0, -1.0, 1.0], "<f4")}, "scales"),
        ({"scales": _b64([1.0, 0.0, 1.0], "<f4")}, "scales"),
        ({"zero_points": _b64([0, 0], "<i4")}, "zero_points"),
        ({"zero_points": _b64([0, 300, 0], "<i4")}, r"\[-128, 127\]"),
        ({"zero_points": None}, "zero_points"),
        ({"axis": 0}, "axis"),
        ({"axis": True}, "axis"),
    ],
)
def test_bad_int8_channel_params_rejected(changes, match):
    enc = encode(torch.randn(2, 3, 4), "int8-channel")
    with pytest.raises(CodecError, match=match):
        decode(enc.data, enc.datatype, enc.shape, _with(enc, **changes))


def test_int8_channel_needs_two_dims_on_decode():
    enc = encode(torch.randn(2, 3), "int8-channel")
    with pytest.raises(CodecError, match="ndim >= 2"):
        decode(enc.data[:3], "INT8", [3], enc.params)


def test_zlib_bomb_rejected_with_bounded_memory():
    bomb = zlib.compress(bytes(16 << 20), 9)  # ~16 KiB that inflates to 16 MiB
    assert len(bomb) < 1 << 15
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match="more than the expected 16 bytes"):
            decode(bomb, "FP32", [1, 4], {"compression": "zlib"})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_zlib_corrupt_truncated_short_and_trailing_rejected():
    good = zlib.compress(bytes(16))
    params = {"compression": "zlib"}
    assert decode(good, "FP32", [4], params).shape == (4,)
    assert decode(zlib.compress(b""), "FP32", [0, 3], params).shape == (0, 3)
    cases = [
        (b"not zlib at all", [4], "corrupt"),
        (good[:-3], [4], "truncated"),
        (zlib.compress(bytes(12)), [4], "needs exactly"),
        (good + b"junk", [4], "trailing"),
        (zlib.compress(bytes(1)), [0], "more than the expected 0"),
    ]
    for blob, shape, match in cases:
        with pytest.raises(CodecError, match=match):
            decode(blob, "FP32", shape, params)


def test_data_must_be_bytes_like():
    with pytest.raises(CodecError, match="bytes"):
        decode("abcd", "FP32", [1])
    assert decode(bytearray(4), "FP32", [1]).shape == (1,)
    assert decode(memoryview(bytes(8)), "FP32", [2]).shape == (2,)


# --- fuzzing: decode either returns the declared shape or raises CodecError ---------------

_KEYS = ["codec", "compression", "scale", "zero_point", "scales", "zero_points", "axis"]
_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.floats(), st.text(max_size=8),
    st.just(10**5000),  # too long for repr() and float()
    st.sampled_from(list(CODECS) + list(COMPRESSIONS)),
    st.binary(max_size=24).map(lambda b: base64.b64encode(b).decode()),
    st.lists(st.integers(), max_size=2),
)
_DIMS = st.one_of(st.integers(-2, 6), st.integers(-(1 << 70), 1 << 70), st.floats(), st.text(),
                  st.just(10**5000))


def _check_decode(data, datatype, shape, params):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            y = decode(data, datatype, shape, params, max_elements=4096)
        except CodecError:
            return
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
    assert tuple(y.shape) == tuple(shape) and y.is_contiguous()


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=64),
    st.one_of(st.sampled_from(["FP32", "FP16", "INT8", "BF16", ""]), st.text(max_size=4)),
    st.one_of(st.lists(_DIMS, max_size=4), st.lists(st.integers(0, 4), max_size=4), st.text()),
    st.one_of(st.none(), st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=3), _VALUES)),
)
def test_decode_fuzz_never_raises_anything_else(data, datatype, shape, params):
    _check_decode(data, datatype, shape, params)


@settings(max_examples=200, deadline=None)
@given(
    tensors(min_dims=2, bound=100.0),
    st.sampled_from(CODECS),
    st.sampled_from(COMPRESSIONS),
    st.sampled_from(["data", "shape", "datatype", "param"]),
    st.data(),
)
def test_decode_fuzz_mutated_valid_payloads(x, name, compression, field, draw):
    data, datatype, shape, params = _wire(encode(x, name, compression))
    shape = list(shape)
    if field == "data":
        data = bytearray(data)
        if data and draw.draw(st.booleans()):
            data[draw.draw(st.integers(0, len(data) - 1))] ^= draw.draw(st.integers(1, 255))
        else:
            data = data[: draw.draw(st.integers(0, len(data)))] + draw.draw(st.binary(max_size=4))
        data = bytes(data)
    elif field == "shape":
        shape[draw.draw(st.integers(0, len(shape) - 1))] = draw.draw(_DIMS)
    elif field == "datatype":
        datatype = draw.draw(st.sampled_from(["FP32", "FP16", "INT8", "UINT8"]))
    else:
        params[draw.draw(st.sampled_from(_KEYS))] = draw.draw(_VALUES)
    _check_decode(data, datatype, shape, params)

"""Rate–accuracy of the wire codecs: bytes per request and test accuracy at every cut, and
the ``rate`` step of ``edgesplit compress`` (the runtime's codecs are measured here, so the
partitioner's pipeline gets this step from the command that composes them).

Every request's crossing tensor is encoded on its own through
:mod:`edgesplit.runtime.codec` (as the device runner does: one scale per request for
``int8``), decoded, and the tail finishes the prediction. Bytes per request count the
payload and the side information the receiver needs (``int8``: a scale and a zero point,
8 bytes; ``int8-channel``: 8 bytes per channel), averaged over requests when zlib makes
them vary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from edgesplit.models.split_model import SplitModel
from edgesplit.runtime.codec import decode, encode

LOSSY = ("fp16", "int8", "int8-channel")


def side_bytes(codec: str, channels: int) -> int:
    """Bytes of quantization parameters that travel with a tensor under ``codec``."""
    return {"int8": 8, "int8-channel": 8 * channels}.get(codec, 0)


def wire_roundtrip(h: torch.Tensor, codec: str, compression: str = "none") -> tuple[torch.Tensor, list[int]]:
    """Each row of ``h`` encoded alone and decoded; and each request's bytes."""
    rows, sizes = [], []
    extra = side_bytes(codec, h.shape[1] if h.ndim > 1 else 1)
    for row in h:
        enc = encode(row.unsqueeze(0), codec, compression)
        rows.append(decode(enc.data, enc.datatype, enc.shape, enc.params))
        sizes.append(len(enc.data) + extra)
    return torch.cat(rows), sizes


@torch.no_grad()
def codec_point(head: Callable[[torch.Tensor], torch.Tensor], tail: Callable[[torch.Tensor], torch.Tensor],
                x: torch.Tensor, y: torch.Tensor, codec: str, zlib_sample: int = 500, batch_size: int = 500
                ) -> dict:
    """Accuracy through ``codec`` and the mean bytes per request, raw and zlib-compressed."""
    hits, raw = 0, []
    zipped: list[int] = []
    for s in range(0, len(y), batch_size):
        h = head(x[s : s + batch_size])
        decoded, sizes = (h, [h[0].numel() * 4] * len(h)) if codec == "fp32" else wire_roundtrip(h, codec)
        raw += sizes
        if len(zipped) < zlib_sample:
            zipped += wire_roundtrip(h[: zlib_sample - len(zipped)], codec, "zlib")[1]
        hits += int((tail(decoded).argmax(1) == y[s : s + batch_size]).sum())
    return {"codec": codec, "accuracy": hits / len(y), "bytes": sum(raw) / len(raw),
            "bytes_zlib": sum(zipped) / len(zipped)}


def codec_curve(model: SplitModel, x: torch.Tensor, y: torch.Tensor, cuts: list[int] | None = None,
                codecs: tuple[str, ...] = ("fp32",) + LOSSY, progress: bool = False) -> list[dict]:
    """A :func:`codec_point` for every codec at every inner cut (and the image at cut 0)."""
    from tqdm import tqdm

    model.eval()
    cuts = cuts if cuts is not None else list(range(0, model.num_blocks))
    points = []
    jobs = [(c, k) for c in cuts for k in codecs]
    for cut, codec in tqdm(jobs, desc="rate-accuracy", disable=not progress, leave=False):
        point = codec_point(lambda b, c=cut: model.run(b, 0, c), lambda h, c=cut: model.run(h, c), x, y, codec)
        points.append({"cut": cut, **point})
    return points


def run_rate(cfg, base: str, data, out, progress: bool = True) -> dict:
    """The ``rate`` step: every codec at every cut of the shipped model, on the test set."""
    import time

    from edgesplit.models import load_trained

    started = time.time()
    model = load_trained(base)
    limit = cfg.test_images or len(data.test_y)
    x, y = data.test_x[:limit], data.test_y[:limit]
    with torch.no_grad():
        reference = float((model(x).argmax(1) == y).float().mean())
    return {"reference": reference, "test_images": len(y), "curve": codec_curve(model, x, y, progress=progress),
            "seconds": round(time.time() - started, 1)}

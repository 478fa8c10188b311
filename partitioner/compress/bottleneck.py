"""A learned bottleneck at a cut: an encoder on the device shrinks the crossing tensor to a
few channels (optionally at lower resolution) quantized to 8 bits; a decoder on the edge
restores it for the original tail.

Training is supervised compression by distillation (as in supervised compression for split
computing): the device's head stays as shipped (so its exits are unchanged), the head's
outputs and the original model's logits are computed once, and the encoder and decoder are
trained with the tail frozen to make the tail's answer match the original's (KL at
temperature ``T`` plus cross-entropy) and the decoded tensor match the original crossing
tensor (MSE); then the edge tail is fine-tuned end to end with them. Quantization in
training is the straight-through estimator on the 8-bit code.

On the wire the code travels through :mod:`edgesplit.runtime.codec` (``int8``, optionally
zlib), so the bytes counted are the bytes a request carries.

Example::

    >>> import torch
    >>> from edgesplit.models import build_model
    >>> model = build_model("resnet_fm").eval()
    >>> b = Bottleneck(model.cut_points()[7].shape, channels=4, stride=2)
    >>> b.code_shape, b.code_bytes
    ((4, 7, 7), 196)
    >>> h = model.run(torch.zeros(2, 1, 28, 28), 0, 7)
    >>> tuple(b.decode(b.encode(h)).shape)
    (2, 32, 14, 14)
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from edgesplit.models.datasets import IMAGE_BYTES
from edgesplit.models.split_model import SplitModel
from edgesplit.models.train import nesterov_sgd
from edgesplit.models.weights_io import write_safetensors

from .checkpoint import fast_forward, load_checkpoint, read_progress, save_checkpoint
from .data import Splits, accuracy
from .distill import kd_loss

LEVELS = 255  # 8-bit code


class Bottleneck(nn.Module):
    """Encoder (device) and decoder (edge) around a crossing tensor of shape ``(C, H, W)``."""

    def __init__(self, shape: tuple[int, ...], channels: int, stride: int = 1) -> None:
        super().__init__()
        c, h, w = shape
        if channels < 1 or stride not in (1, 2, 4) or h % stride or w % stride:
            raise ValueError(f"cannot make a {channels}-channel, stride-{stride} bottleneck for a {shape} tensor")
        self.shape, self.channels, self.stride = tuple(shape), channels, stride
        down: list[nn.Module] = []
        for _ in range(int(math.log2(stride))):
            down += [nn.Conv2d(c, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        self.encoder = nn.Sequential(
            nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True), *down,
            nn.Conv2d(c, channels, 1),
        )
        up: list[nn.Module] = []
        for _ in range(int(math.log2(stride))):
            up += [nn.ConvTranspose2d(c, c, 4, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        self.decoder = nn.Sequential(
            nn.Conv2d(channels, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True), *up,
            nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
        )

    @property
    def code_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.shape[1] // self.stride, self.shape[2] // self.stride)

    @property
    def code_bytes(self) -> int:
        return math.prod(self.code_shape)

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """The code in [0, 1], on the 8-bit grid (straight-through in training)."""
        code = torch.sigmoid(self.encoder(h))
        return code + (torch.round(code * LEVELS) / LEVELS - code).detach()

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return self.decoder(code)


class BottleneckModel(nn.Module):
    """A split model with a bottleneck at ``cut``: head, encoder | wire | decoder, tail."""

    def __init__(self, model: SplitModel, cut: int, bottleneck: Bottleneck) -> None:
        super().__init__()
        self.model, self.cut, self.bottleneck = model, cut, bottleneck

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck.encode(self.model.run(x, 0, self.cut))

    def tail(self, code: torch.Tensor) -> torch.Tensor:
        return self.model.run(self.bottleneck.decode(code), self.cut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.head(x))


@torch.no_grad()
def crossing_and_logits(model: SplitModel, cut: int, x: torch.Tensor, batch_size: int = 500
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """What crosses ``cut`` and the final logits, for every image in ``x``."""
    model.eval()
    hs, logits = [], []
    for s in range(0, len(x), batch_size):
        h = model.run(x[s : s + batch_size], 0, cut)
        hs.append(h)
        logits.append(model.run(h, cut))
    return torch.cat(hs), torch.cat(logits)


def _epochs(net: BottleneckModel, params, h: torch.Tensor, h_logits: torch.Tensor, y: torch.Tensor, epochs: int,
            cfg, recon_weight: float, checkpoint: Path, desc: str, progress: bool, val) -> list[dict]:
    optimizer = nesterov_sgd(params, cfg.max_lr, 0.9, 5e-4)
    steps = math.ceil(len(y) / cfg.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.max_lr, epochs=max(1, epochs),
                                                   steps_per_epoch=steps)
    history, start = [], 0
    fingerprint = {"config": asdict(cfg), "epochs": epochs, "cut": net.cut, "channels": net.bottleneck.channels,
                   "stride": net.bottleneck.stride, "recon_weight": recon_weight}
    if read_progress(checkpoint, fingerprint) is not None:
        saved = load_checkpoint(checkpoint, net, optimizer)
        start, history = saved["epoch"], saved["history"]
        fast_forward(schedule, start * steps)
    for epoch in range(start, epochs):
        net.train()
        net.model.eval()  # the batch norms of the shipped head and tail keep their statistics
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        bar = tqdm(range(steps), desc=f"{desc} epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        running = 0.0
        for step in bar:
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            hb, tb, yb = h[idx], h_logits[idx], y[idx]
            decoded = net.bottleneck.decode(net.bottleneck.encode(hb))
            out = net.model.run(decoded, net.cut)
            loss = kd_loss(out, tb, yb, cfg.temperature, cfg.kd_weight)
            if recon_weight:
                loss = loss + recon_weight * F.mse_loss(decoded, hb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += float(loss.detach())
        history.append({"epoch": epoch + 1, "loss": round(running / steps, 4), "val_accuracy": round(val(), 4)})
        if progress:
            tqdm.write(f"{desc} epoch {epoch + 1}: validation accuracy {history[-1]['val_accuracy']:.4f}")
        save_checkpoint(checkpoint, net, optimizer, {"epoch": epoch + 1, "history": history}, config=fingerprint)
    return history


def train_bottleneck(model: SplitModel, cut: int, channels: int, stride: int, data: Splits, cfg,
                     checkpoint_dir: Path, progress: bool = True) -> tuple[BottleneckModel, dict]:
    """Train a bottleneck at ``cut`` (tail frozen), then fine-tune the tail with it."""
    started = time.time()
    net = BottleneckModel(copy.deepcopy(model).eval(), cut, Bottleneck(model.cut_points()[cut].shape, channels, stride))
    for p in net.model.parameters():
        p.requires_grad_(False)
    h, logits = crossing_and_logits(model, cut, data.x)
    tag = f"bottleneck-cut{cut}-c{channels}-s{stride}"

    def val() -> float:
        net.eval()
        return accuracy(net, data.val_x, data.val_y)

    frozen = _epochs(net, list(net.bottleneck.parameters()), h, logits, data.y, cfg.epochs, cfg, 1.0,
                     checkpoint_dir / f"{tag}-frozen", f"{tag} (tail frozen)", progress, val)
    tail = [p for blk in net.model.blocks[cut:] for p in blk.parameters()]
    for p in tail:
        p.requires_grad_(True)
    tuned = _epochs(net, list(net.bottleneck.decoder.parameters()) + tail, h, logits, data.y, cfg.finetune_epochs,
                    cfg, 0.0, checkpoint_dir / f"{tag}-tuned", f"{tag} (end to end)", progress, val)
    net.eval()
    return net, {"history": frozen + tuned, "train_seconds": round(time.time() - started, 1)}


def save_bottleneck(net: BottleneckModel, path: str | Path) -> None:
    """Encoder, decoder and the fine-tuned tail blocks as safetensors (the head is the shipped one)."""
    state = {f"bottleneck.{k}": v.contiguous().clone() for k, v in net.bottleneck.state_dict().items()}
    for i, block in enumerate(net.model.blocks[net.cut :], start=net.cut):
        state.update({f"blocks.{i}.{k}": v.contiguous().clone() for k, v in block.state_dict().items()})
    b = net.bottleneck
    write_safetensors(state, path, metadata={"cut": str(net.cut), "channels": str(b.channels), "stride": str(b.stride),
                                          "shape": ",".join(map(str, b.shape))})


BOTTLENECK_FILE = "bottleneck.safetensors"  # in a bundle, listed and hashed by its manifest


def load_bottleneck(model: SplitModel, path: str | Path) -> BottleneckModel:
    """Rebuild a saved bottleneck on ``model`` (a copy of it: its tail is replaced). A file
    that is not a bottleneck of this model, or holds non-finite weights, is a ValueError.
    For a bundle's bottleneck use :func:`bottleneck_from_bundle`, which also checks the file
    against the manifest that hashed it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None
    try:
        cut, channels, stride = int(meta["cut"]), int(meta["channels"]), int(meta["stride"])
    except (KeyError, ValueError):
        raise ValueError(f"{path} is not a saved bottleneck (metadata {sorted(meta)})") from None
    if not 0 < cut < model.num_blocks:
        raise ValueError(f"{path}: cut {cut} is not an inner cut of {model.name}")
    width = model.cut_points()[cut].shape[0]
    if not 0 < channels <= width or stride not in (1, 2, 4):
        raise ValueError(f"{path}: a {channels}-channel, stride-{stride} code does not fit cut {cut} "
                         f"({width} channels; strides 1, 2, 4)")
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise ValueError(f"{path}: tensor {bad} holds NaN or Inf values")
    net = BottleneckModel(copy.deepcopy(model).eval(), cut, Bottleneck(model.cut_points()[cut].shape, channels, stride))
    from edgesplit.partitioner.bundle import state_dict_mismatch

    try:
        net.bottleneck.load_state_dict({k[11:]: v for k, v in state.items() if k.startswith("bottleneck.")})
        blocks = {k[7:]: v for k, v in state.items() if k.startswith("blocks.")}
        for i in range(cut, model.num_blocks):
            prefix = f"{i}."
            net.model.blocks[i].load_state_dict({k[len(prefix):]: v for k, v in blocks.items()
                                                 if k.startswith(prefix)})
    except RuntimeError as exc:
        raise ValueError(f"{path} does not fit a cut-{cut} bottleneck of {model.name}: "
                         f"{state_dict_mismatch(exc)}") from None
    return net.eval()


def bottleneck_from_bundle(bundle) -> BottleneckModel:
    """The bottleneck a bundle carries (see :func:`run_bottleneck`): its file must be one the
    manifest lists and hashed (``load_bundle`` checked the hash), and what the file holds must
    be what the manifest's ``bottleneck`` section says (cut, channels, stride, code shape)."""
    info = bundle.manifest.get("bottleneck")
    if not isinstance(info, dict):
        raise ValueError(f"{bundle.path} carries no bottleneck section in its manifest")
    if BOTTLENECK_FILE not in bundle.manifest.get("files", {}):
        raise ValueError(f"{bundle.path}: {BOTTLENECK_FILE} is not a file the manifest lists and hashes")
    net = load_bottleneck(bundle.model, bundle.path / BOTTLENECK_FILE)
    held = {"cut": net.cut, "channels": net.bottleneck.channels, "stride": net.bottleneck.stride,
            "code_shape": list(net.bottleneck.code_shape)}
    said = {k: info.get(k) for k in held}
    if said != held:
        raise ValueError(f"{bundle.path / BOTTLENECK_FILE} holds {held}, the manifest says {said}")
    return net


SIDE_BYTES = 8  # the int8 codec's scale and zero point travel with each code


@torch.no_grad()
def code_point(net: BottleneckModel, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> dict:
    """Accuracy with the 8-bit code, and bytes per request: the code plus the int8 codec's
    scale and zero point, raw and zlib-compressed (each request's code on its own).
    ``edgesplit.runtime.rate.codec_point`` measures the same through the runtime's codec."""
    import zlib

    net.eval()
    hits, zipped = 0, []
    for s in range(0, len(y), batch_size):
        code = net.head(x[s : s + batch_size])
        hits += int((net.tail(code).argmax(1) == y[s : s + batch_size]).sum())
        levels = torch.round(code * LEVELS).to(torch.uint8).numpy()
        zipped += [len(zlib.compress(row.tobytes())) + SIDE_BYTES for row in levels]
    return {"accuracy": hits / len(y), "bytes": float(net.bottleneck.code_bytes + SIDE_BYTES),
            "bytes_zlib": sum(zipped) / len(zipped)}


def run_bottleneck(cfg, base: str, data: Splits, out: Path, progress: bool = True) -> dict:
    """Train every configured bottleneck candidate; pick the best on the
    validation split (fewest bytes per request within ``max_drop_points`` of the shipped
    model, then the earliest cut); write it into the bundle ``OUT/<base>_bottleneck``."""
    from edgesplit.models import load_trained
    from edgesplit.partitioner.bundle import attach_file, write_bundle


    model = load_trained(base)
    started = time.time()
    val_base = accuracy(model, data.val_x, data.val_y)
    test_base = accuracy(model, data.test_x, data.test_y)
    candidates = []
    for cut, channels, stride in cfg.candidates:
        net, trained = train_bottleneck(model, cut, channels, stride, data, cfg, out / "checkpoints", progress)
        val = code_point(net, data.val_x, data.val_y)
        test = code_point(net, data.test_x, data.test_y)
        candidates.append({"cut": cut, "channels": channels, "stride": stride,
                           "code_shape": list(net.bottleneck.code_shape),
                           "val_accuracy": val["accuracy"], "test_accuracy": test["accuracy"],
                           "bytes": test["bytes"], "bytes_zlib": test["bytes_zlib"],
                           "bytes_fp32": model.cut_points()[cut].numel * 4, **trained, "net": net})
    fits = [c for c in candidates if (val_base - c["val_accuracy"]) * 100 <= cfg.max_drop_points]
    pool = fits or candidates
    best = min(pool, key=lambda c: (c["bytes"], c["cut"]) if fits else (-c["val_accuracy"], c["bytes"]))
    bundle = out / f"{base}_bottleneck"
    write_bundle(model, bundle)
    save_bottleneck(best["net"], bundle / BOTTLENECK_FILE)
    info = {k: best[k] for k in ("cut", "channels", "stride", "code_shape", "bytes", "bytes_zlib", "bytes_fp32")}
    attach_file(bundle, BOTTLENECK_FILE, "bottleneck", {**info, "codec": "bottleneck+int8"})
    table = [{k: v for k, v in c.items() if k != "net"} for c in candidates]
    return {
        "cut": best["cut"], "bytes_fp32": best["bytes_fp32"], "bytes_sent": best["bytes"],
        "bytes_sent_zlib": best["bytes_zlib"], "image_bytes": IMAGE_BYTES,
        "acc_before": test_base, "acc_after": best["test_accuracy"],
        "acc_drop_points": round((test_base - best["test_accuracy"]) * 100, 2),
        "val_accuracy_before": val_base, "chosen_on_validation": bool(fits), "candidates": table,
        "train_seconds": round(time.time() - started, 1),
    }

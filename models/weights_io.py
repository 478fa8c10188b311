"""Save and load model weights as safetensors with a sha256 side file; never pickle.

The card (``<name>.json`` beside the weights) records the file's sha256; loading checks it
and refuses weights that differ, and weights without a card or a card without a hash.
"""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import safetensors
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from .split_model import SplitModel


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                      metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as a safetensors file with the usual file mode (0666 less the umask,
    as for the manifest beside it): safetensors' own ``save_file`` makes it 0600, which a
    node running as another user cannot read."""
    data = safetensors_save(tensors, metadata=metadata)
    with open(path, "wb") as f:
        f.write(data)


def save_weights(model: SplitModel, path: str | Path) -> str:
    """Write the state dict as safetensors; return its sha256."""
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    write_safetensors(state, path, metadata={"model": model.name})
    return sha256_file(path)


def card_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


MAX_JSON_BYTES = 16 * 1024 * 1024  # a card or manifest larger than this is refused unread


def read_regular_file(path: str | Path, what: str = "file", max_bytes: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of ``path``, a regular file of at most ``max_bytes``; ValueError (naming
    ``what``) for anything else, checked before a byte is read: a FIFO would block, a link
    to ``/dev/zero`` or a sparse file of terabytes would fill memory."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError as exc:
        raise ValueError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{what} {path} is not a regular file")
    if info.st_size > max_bytes:
        raise ValueError(f"{what} {path}: {info.st_size:,} bytes, over the {max_bytes:,} allowed")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise ValueError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None
    if len(data) > max_bytes:  # grew since the stat
        raise ValueError(f"{what} {path}: over the {max_bytes:,} bytes allowed")
    return data


def read_json_file(path: str | Path, what: str = "file", max_bytes: int = MAX_JSON_BYTES):
    """The JSON value in ``path``, a regular file of at most ``max_bytes``; ValueError
    (naming ``what``) for anything else: a FIFO that would block, ``/dev/zero`` that would
    fill memory, a directory, text that is not JSON or nests deeper than the parser goes."""
    data = read_regular_file(path, what, max_bytes)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} {path} is not valid JSON ({exc})") from None
    except RecursionError:
        raise ValueError(f"{what} {path} is not valid JSON (nested too deeply)") from None


def weights_limit(model: torch.nn.Module) -> int:
    """The most bytes a weights file of ``model`` (or of a pruned or re-headed copy of it) can
    hold: twice its float32 state plus 16 MiB of headers and extra heads. A larger file is
    refused before it is read."""
    state = sum(t.numel() for t in model.state_dict().values())
    return 2 * 4 * state + (16 << 20)


def load_weights(model: SplitModel, path: str | Path, verify: bool = True) -> None:
    """Load safetensors weights into ``model``, checking the sha256 recorded in the card.

    With ``verify`` (the default) the card (``<name>.json`` beside the weights) must exist
    and record the sha256 of the bytes loaded: the file is read once, hashed, and loaded from
    those bytes, so what is checked is what is loaded. Weights without a card, or a card
    without a hash, are refused (ValueError)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no weights at {path}; train them with 'edgesplit train {model.name}'")
    data = read_regular_file(path, "weights", weights_limit(model))
    if verify:
        card = card_path(path)
        if not card.exists():
            raise ValueError(f"{path}: no card {card.name} beside it recording its sha256; refusing unverified "
                             "weights ('edgesplit train' writes one)")
        record = read_json_file(card, "weights card")
        expected = record.get("sha256") if isinstance(record, dict) else None
        if not isinstance(expected, str) or len(expected) != 64:
            raise ValueError(f"{card} records no sha256 of {path.name}; refusing to load unverified weights")
        actual = hashlib.sha256(data).hexdigest()
        if expected.lower() != actual:
            raise ValueError(f"{path}: sha256 {actual} differs from {expected} recorded in {card}; refusing to load")
    try:
        state = safetensors_load(data)
        model.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()})
    except (RuntimeError, safetensors.SafetensorError) as exc:  # another model's weights, or not safetensors
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: not weights of {model.name} ({first})") from None

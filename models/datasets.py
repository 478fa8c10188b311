"""Fashion-MNIST from gzip IDX files, with a small shipped sample so nothing is downloaded.

Where the files come from: the ``root`` argument when one is given, else ``$EDGESPLIT_DATA``
when it is set (either way a folder without the files is an error, never a quiet fall-back),
else Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``).

Example::

    >>> from edgesplit.models.datasets import load_sample
    >>> images, labels = load_sample()
    >>> images.shape, images.dtype
    ((1000, 28, 28), dtype('uint8'))
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
SAMPLE_DIR = Path(__file__).parent / "data"
SPLIT_PREFIX = {"train": "train", "test": "t10k"}
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_BYTES = 28 * 28  # one uint8 image, the least a device can send instead of a crossing tensor
# Per-pixel statistics of the Fashion-MNIST training set (after scaling to [0, 1]).
MEAN = 0.2860
STD = 0.3530
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
# Far above Fashion-MNIST's 60,000 x 28 x 28; guards against corrupt headers.
_MAX_IDX_ELEMENTS = 1 << 30


class DatasetNotFoundError(FileNotFoundError):
    """Raised when the Fashion-MNIST files are not where edgesplit looks for them."""


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzip-compressed or plain) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path}: too short to be an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    header_end = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header_end])
    dtype = np.dtype(_IDX_DTYPES[dtype_code])
    count = int(np.prod(dims, dtype=np.int64))
    if count > _MAX_IDX_ELEMENTS or len(data) - header_end != count * dtype.itemsize:
        raise ValueError(f"{path}: header says {dims} but the payload has another size")
    return np.frombuffer(data, dtype=dtype, offset=header_end).reshape(dims).copy()


def _holds_dataset(folder: Path) -> bool:
    return (folder / "t10k-images-idx3-ubyte.gz").exists() or (folder / "t10k-images-idx3-ubyte").exists()


def _explicit(folder: Path, named: str) -> Path:
    """``folder`` if it holds the dataset; DatasetNotFoundError saying why not."""
    if _holds_dataset(folder):
        return folder
    why = "does not exist" if not folder.exists() else "is not a folder" if not folder.is_dir() else (
        "does not hold t10k-images-idx3-ubyte[.gz]")
    raise DatasetNotFoundError(
        f"Fashion-MNIST data folder {folder} {why} (the folder {named}); it needs train-images-idx3-ubyte.gz, "
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz. With no folder "
        "given (no --data, no EDGESPLIT_DATA) the Debian package is used: "
        "'sudo apt-get install dataset-fashion-mnist'"
    )


def find_data_dir(root: str | Path | None = None) -> Path:
    """Return the folder holding the Fashion-MNIST IDX files, or raise with how to get them.

    A folder asked for — ``root``, else ``$EDGESPLIT_DATA`` — is the only one tried:
    training on another dataset than the one asked for would go unnoticed."""
    if root:
        return _explicit(Path(root), "given")
    if os.environ.get("EDGESPLIT_DATA"):
        return _explicit(Path(os.environ["EDGESPLIT_DATA"]), "in $EDGESPLIT_DATA")
    if _holds_dataset(DEBIAN_DIR):
        return DEBIAN_DIR
    raise DatasetNotFoundError(
        f"Fashion-MNIST not found (looked in: {DEBIAN_DIR}). Install it with "
        "'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu), or put the four files "
        "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        "t10k-labels-idx1-ubyte.gz in a folder and set EDGESPLIT_DATA to it. "
        "The shipped 1,000-image sample (load_sample) needs neither."
    )


def _idx_file(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).exists():
            return folder / name
    raise DatasetNotFoundError(f"{folder / stem}[.gz] is missing; see find_data_dir for how to get it")


def load_fashion_mnist(split: str = "test", root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load a split (``"train"`` or ``"test"``) as ``(uint8 images [N, 28, 28], uint8 labels [N])``."""
    if split not in SPLIT_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    folder = find_data_dir(root)
    prefix = SPLIT_PREFIX[split]
    images = read_idx(_idx_file(folder, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_idx_file(folder, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{folder}: images {images.shape} and labels {labels.shape} do not match")
    return images, labels


def load_sample() -> tuple[np.ndarray, np.ndarray]:
    """The 1,000-image sample of the test set shipped in the repository."""
    images = read_idx(SAMPLE_DIR / "sample-images-idx3-ubyte.gz")
    labels = read_idx(SAMPLE_DIR / "sample-labels-idx1-ubyte.gz")
    return images, labels


def load_images(source: str = "sample", root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load ``"sample"``, ``"test"`` or ``"train"`` images and labels."""
    return load_sample() if source == "sample" else load_fashion_mnist(source, root)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 28, 28] images to a normalised float32 tensor [N, 1, 28, 28]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    return x.sub_(MEAN).div_(STD).unsqueeze(1)


@dataclass
class TensorBatches:
    """Shuffled mini-batches of (normalised images, labels), optionally augmented."""

    images: torch.Tensor
    labels: torch.Tensor
    batch_size: int
    shuffle: bool = True
    augment: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        self._generator = torch.Generator().manual_seed(self.seed)

    def __len__(self) -> int:
        return (len(self.labels) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        n = len(self.labels)
        order = torch.randperm(n, generator=self._generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            x, y = self.images[idx], self.labels[idx]
            if self.augment:
                x = _random_crop_flip(x, self._generator)
            yield x, y


def _random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random horizontal flip and random shift by up to ``pad`` pixels (background-padded)."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    background = -MEAN / STD
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=background)
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    return padded[:, :, dy : dy + h, dx : dx + w].contiguous()


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzip IDX file (deterministic bytes: no timestamp)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(header + array.tobytes())


def make_sample(out_dir: str | Path = SAMPLE_DIR, per_class: int = 100, root: str | Path | None = None) -> None:
    """Write the shipped sample: the first ``per_class`` test images of each class."""
    images, labels = load_fashion_mnist("test", root)
    picked = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_idx(out_dir / "sample-images-idx3-ubyte.gz", images[picked])
    write_idx(out_dir / "sample-labels-idx1-ubyte.gz", labels[picked])

"""Argument types for the ``edgesplit`` command line: a value out of range exits 2 with one
clear line from argparse, before any work starts.

    >>> positive_int("3")
    3
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, not {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, not {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, not {text}")
    return value


def port_or_off(text: str) -> int:
    """argparse type: a TCP port 0..65535 (0: any free one), or -1 for none."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not -1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 0 to 65535 (or -1: none), not {text}")
    return value


def image_file(text: str) -> str:
    """argparse type: an image file to write (``output_file``) named with a format matplotlib
    writes (.png, .svg, .pdf, .jpg, ...): an unknown one failed only after the table."""
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    if Path(text).suffix.lower().lstrip(".") not in formats:
        raise argparse.ArgumentTypeError(f"{text}: give an image file name ending in one of "
                                         f"{', '.join('.' + f for f in sorted(formats))}")
    return output_file(text)


def fraction(text: str) -> float:
    """argparse type: a number from 0 to 1 (a share, an accuracy, a battery level)."""
    value = _finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1, not {text}")
    return value


MAX_PROFILE_BATCH = 256  # a batch of 200,000 tried to allocate 10 GB before failing


def batch_sizes(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated batch sizes, each an integer from 1 to 256 (e.g. ``1,4``)."""
    try:
        sizes = tuple(positive_int(part.strip()) for part in text.split(","))
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers >= 1, e.g. 1,4 ({exc})") from None
    if max(sizes) > MAX_PROFILE_BATCH:
        raise argparse.ArgumentTypeError(f"{text!r}: batch sizes go up to {MAX_PROFILE_BATCH}")
    return sizes


def zoo_model(name: str) -> str:
    """argparse type: the name of a model in the zoo."""
    from edgesplit.models import MODELS

    if name not in MODELS:
        raise argparse.ArgumentTypeError(f"unknown model {name!r}; the zoo has {sorted(MODELS)}")
    return name


def output_file(text: str) -> str:
    """argparse type: a file to write: not a folder, in a folder that exists."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: permission denied")
    return text


def output_dir(text: str) -> str:
    """argparse type: a folder to write into: an existing folder, or a path that can become one."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    existing = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{existing} is not a folder, so {text} cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write into {existing}: permission denied")
    return text


# the benchmark names, without importing the benchmarks (checked against edgesplit.bench.BENCHMARKS in a test)
BENCHMARK_NAMES = ("accuracy", "linksim", "chaos", "throughput", "split", "controller", "nonn", "compress")


def json_output_file(text: str) -> str:
    """argparse type: a results file to write, whose folder exists or can be made (not a
    ``.png``: the plot goes beside the results under that name)."""
    path = Path(text)
    if path.suffix.lower() == ".png":
        raise argparse.ArgumentTypeError(f"{text} would be overwritten by the plot written beside the results; "
                                         "give a .json name")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    output_dir(str(path.parent))  # an existing folder, or one that can be made
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: permission denied")
    return text

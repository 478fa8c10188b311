"""Benchmark entry points, run as ``edgesplit bench NAME [--quick] [--json PATH]``.

Each benchmark is a module ``edgesplit.bench.<name>`` with two functions:

- ``run(quick: bool = False, progress: bool = True) -> dict``: measure on this machine and
  return JSON-serialisable results (include a ``"machine"`` entry from :func:`machine_info`);
- ``render(result: dict) -> str``: a human-readable table of those results;
- optionally ``plot(result: dict, path: str) -> None``: a picture of them, written beside
  the JSON (same name, ``.png``) when ``--json`` is given.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import platform
import time
from pathlib import Path

BENCHMARKS = ("accuracy", "linksim", "chaos", "throughput", "split", "controller", "nonn", "compress")


def machine_info() -> dict:
    """Where and when a benchmark ran, recorded with its results."""
    import torch

    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


class BenchmarkArgumentError(ValueError):
    """A benchmark asked for with options it cannot run with; raised before any measuring."""


def load(name: str):
    """Import the benchmark module ``name``, with a clear error for unknown names."""
    if name not in BENCHMARKS:
        raise BenchmarkArgumentError(f"unknown benchmark {name!r}; choose one of: {', '.join(BENCHMARKS)}")
    return importlib.import_module(f"edgesplit.bench.{name}")


def run_benchmark(name: str, quick: bool = False, json_path: str | None = None, progress: bool = True,
                  **options) -> dict:
    """Run a benchmark, print its table, and write its results as JSON when asked.

    ``options`` (those not None) go to the benchmark's ``run``, e.g. ``traces`` for ``controller``;
    one the benchmark does not take is a BenchmarkArgumentError, before anything runs, and
    so is a benchmark's own ``check_options`` refusing them. The JSON is written to a
    temporary file first and renamed, so an interruption never leaves half a file (nor
    loses the results of an earlier run)."""
    module = load(name)
    given = {k: v for k, v in options.items() if v is not None}
    takes = inspect.signature(module.run).parameters
    unused = sorted(k for k in given if k not in takes)
    if unused:
        flags = ", ".join("--" + k.replace("_", "-") for k in unused)
        raise BenchmarkArgumentError(f"{flags} do{'es' if len(unused) == 1 else ''} not apply to this benchmark")
    if hasattr(module, "check_options"):
        module.check_options(quick=quick, **given)  # e.g. every trace read before a test bed is built
    started = time.time()
    result = module.run(quick=quick, progress=progress, **given)
    result.setdefault("benchmark", name)
    result.setdefault("quick", quick)
    result["seconds"] = round(time.time() - started, 2)
    print(module.render(result))
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(partial, path)
        print(f"results written to {json_path}")
        if hasattr(module, "plot"):
            png = str(Path(json_path).with_suffix(".png"))
            module.plot(result, png)
            print(f"plot written to {png}")
    return result


def table(headers: list[str], rows: list[list]) -> str:
    """A plain-text table with aligned columns."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

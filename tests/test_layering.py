"""Dependencies point one way (models <- partitioner <- runtime <- bench), the engine imports
no gRPC, and the client never imports the server: checked in fresh interpreters."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_after(module: str) -> set[str]:
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return set(json.loads(out.stdout))


@pytest.mark.parametrize("module,forbidden", [
    ("edgesplit.models", ("edgesplit.partitioner", "edgesplit.runtime", "grpc")),
    ("edgesplit.models.train", ("edgesplit.partitioner", "edgesplit.runtime")),
    ("edgesplit.partitioner.flops", ("edgesplit.runtime", "grpc")),
    ("edgesplit.runtime.node.dataplane", ("grpc", "edgesplit.runtime.transport", "edgesplit.protos")),
    ("edgesplit.runtime.device.runner", ("grpc", "edgesplit.runtime.transport", "edgesplit.runtime.node")),
    ("edgesplit.runtime.transport.client", ("edgesplit.runtime.node",)),
    ("edgesplit.linksim", ("edgesplit.runtime", "edgesplit.models", "torch")),
    ("edgesplit.partitioner.nonn.train", ("edgesplit.runtime", "grpc")),
    ("edgesplit.partitioner.compress.pipeline", ("edgesplit.runtime", "grpc")),
    ("edgesplit.partitioner.compress.bottleneck", ("edgesplit.runtime", "grpc")),
    ("edgesplit.partitioner.compress.quantize", ("edgesplit.runtime", "grpc")),
    ("edgesplit.partitioner.compress.exits", ("edgesplit.runtime", "grpc")),
    ("edgesplit.partitioner.compress.distill", ("edgesplit.runtime", "grpc")),
    ("edgesplit.runtime.device.ensemble", ("grpc", "edgesplit.runtime.transport", "edgesplit.runtime.node")),
])
def test_layering(module, forbidden):
    loaded = imported_after(module)
    bad = sorted(m for m in loaded for f in forbidden if m == f or m.startswith(f + "."))
    assert not bad, f"{module} pulls in {bad}"


def test_no_import_cycles_between_packages():
    """Package-level edges from the source (lazy imports included) form no cycle.

    ``runtime/cli.py`` is exempt: it is the composition root that mounts every command,
    ``edgesplit bench`` included, and nothing imports it."""
    packages = {"models": "models", "partitioner": "partitioner", "runtime": "runtime", "bench": "bench"}
    edges: dict[str, set[str]] = {p: set() for p in packages}
    for name, folder in packages.items():
        for path in (ROOT / folder).rglob("*.py"):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")) or path == ROOT / "runtime" / "cli.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgesplit."):
                    target = node.module.split(".")[1]
                    if target in packages and target != name:
                        edges[name].add(target)
    order = ["models", "partitioner", "runtime", "bench"]
    for src, targets in edges.items():
        for dst in targets:
            assert order.index(dst) < order.index(src), f"{src} imports {dst}: dependencies must point one way"

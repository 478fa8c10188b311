"""Regenerate the Python gRPC code in this folder from its ``.proto`` sources.

Run ``python -m edgesplit.protos.generate`` (or ``make protos``). The output is a pure
function of the sources and the grpcio-tools version; ``tests/runtime/test_protos.py``
checks that the committed files match a fresh generation.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
SOURCES = ("inference.proto", "edgesplit.proto", "telemetry.proto")


def generate(out_dir: Path = PROTO_DIR) -> list[Path]:
    """Run protoc on every source into ``out_dir``; make the generated imports package-relative."""
    from grpc_tools import protoc

    out_dir = Path(out_dir)
    for source in SOURCES:
        args = [
            "protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", str(PROTO_DIR / source),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {source}")
    written = []
    for path in sorted(out_dir.glob("*_pb2*.py*")):
        text = path.read_text()
        fixed = re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", text, flags=re.M)
        path.write_text(fixed)
        written.append(path)
    return written


def is_current() -> bool:
    """True when the committed generated files equal a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p.read_text() for p in generate(Path(tmp))}
    return all((PROTO_DIR / name).exists() and (PROTO_DIR / name).read_text() == text for name, text in fresh.items())


if __name__ == "__main__":
    for p in generate():
        print(p)
    sys.exit(0)

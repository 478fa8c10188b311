"""Bundles: a prepared model on disk — ``manifest.json`` plus safetensors weights — that the
device and the nodes load alike; never a pickle, every file's sha256 verified on load.

The manifest records the schema version, the zoo model it rebuilds, the hash of the traced
graph, every cut with its crossing tensors' names, shapes and dtypes, its head MACs and
bytes, and the sha256 of every other file. :func:`load_bundle` refuses a bundle whose files
or graph differ from what the manifest says, and says which.

Example::

    >>> import tempfile
    >>> from edgesplit.models import build_model
    >>> out = tempfile.mkdtemp()
    >>> manifest = write_bundle(build_model("resnet_fm"), out)
    >>> manifest["model"], len(manifest["cuts"]) > 10, sorted(manifest["files"])
    ('resnet_fm', True, ['weights.safetensors'])
    >>> load_bundle(out).model.name
    'resnet_fm'
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes

from edgesplit.models import build_model
from edgesplit.models.split_model import SplitModel
from edgesplit.models.weights_io import (
    read_json_file,
    read_regular_file,
    sha256_file,
    weights_limit,
    write_safetensors,
)

from .cuts import GraphCut, enumerate_cuts
from .graph import ModelGraph, trace

SCHEMA = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"


class BundleError(ValueError):
    """A bundle that must not be loaded: the message says which file or field is wrong."""


@dataclass
class Bundle:
    """A loaded, verified bundle."""

    path: Path
    manifest: dict
    model: SplitModel
    graph: ModelGraph


def graph_hash(graph: ModelGraph) -> str:
    """A hash of the traced graph's structure (operations, wiring and shapes, not weights)."""
    h = hashlib.sha256()
    for node in graph.nodes:
        h.update(f"{node.op}|{node.target}|{','.join(node.inputs)}|{node.out_shapes}\n".encode())
    return h.hexdigest()


def _cut_entry(cut: GraphCut, graph: ModelGraph) -> dict:
    dtypes = []
    for name in cut.crossing:
        node = next(n for n in graph.module.graph.nodes if n.name == name)
        value = node.meta.get("value")
        dtypes.append(str(value.dtype).replace("torch.", "") if isinstance(value, torch.Tensor) else "none")
    return {"index": cut.index, "after": cut.after, "crossing": list(cut.crossing),
            "shapes": [list(s) for s in cut.crossing_shapes], "dtypes": dtypes, "bytes": cut.crossing_bytes,
            "head_macs": cut.head_macs, "transferable": cut.transferable}


def write_bundle(model: SplitModel, out_dir: str | Path, extra: dict | None = None, base: str | None = None) -> dict:
    """Write ``model`` (a zoo model, trained or not) as a bundle in ``out_dir``; return the manifest.

    A structurally changed model (pruned: fewer channels) gives ``base``, the zoo name it
    was derived from; its layer shapes go into the manifest's ``architecture`` so loading
    rebuilds it before the weights load (with exit heads at ``exit_cuts``, which may differ
    from the zoo's), and ``name`` keeps the model's own name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    example = torch.zeros(1, *model.input_shape)
    graph = trace(model, (example,))
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    write_safetensors(state, out / WEIGHTS, metadata={"model": model.name})
    changed = {}
    if base is not None:
        from .compress.architecture import layer_shapes

        changed = {"name": model.name, "exit_cuts": model.exit_cuts, "architecture": layer_shapes(model)}
    manifest = {
        "schema": SCHEMA,
        "model": base or model.name,
        **changed,
        "input_shape": list(model.input_shape),
        "tracer": graph.tracer,
        "graph_sha256": graph_hash(graph),
        "total_macs": graph.total_macs,
        "cuts": [_cut_entry(c, graph) for c in enumerate_cuts(graph)],
        "files": {WEIGHTS: sha256_file(out / WEIGHTS)},
        **(extra or {}),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def attach_file(bundle_dir: str | Path, name: str, section: str | None = None, info: dict | None = None) -> dict:
    """Record a file already written into a bundle (its sha256 in ``files``), and ``info``
    under ``section`` of the manifest; return the updated manifest."""
    root = Path(bundle_dir)
    if Path(name).name != name or not (root / name).is_file():
        raise BundleError(f"{root / name} is not a file directly inside the bundle")
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["files"][name] = sha256_file(root / name)
    if section is not None:
        manifest[section] = info or {}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def state_dict_mismatch(exc: RuntimeError) -> str:
    """The first thing torch's ``load_state_dict`` found wrong (a missing or unexpected key, a
    size mismatch), on one line of at most 300 characters, not just its heading."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)
    return detail if len(detail) <= 300 else detail[:297] + "..."


def load_bundle(path: str | Path) -> Bundle:
    """Load and verify a bundle: schema, every file's sha256, the rebuilt model's graph hash."""
    root = Path(path)
    manifest_path = root / MANIFEST
    if not manifest_path.exists():
        raise BundleError(f"{root} is not a bundle: no {MANIFEST}; make one with 'edgesplit plan MODEL --out DIR'")
    try:
        manifest = read_json_file(manifest_path, "manifest")  # a regular file of bounded size only
    except ValueError as exc:
        raise BundleError(f"{exc}; refusing to load") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path} holds a {type(manifest).__name__}, not a manifest object")
    if type(manifest.get("schema")) is not int or manifest["schema"] != SCHEMA:  # true == 1 in Python
        raise BundleError(f"{manifest_path}: schema {manifest.get('schema')!r:.40}, this edgesplit reads {SCHEMA}")
    files = manifest.get("files") or {}
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise BundleError(f"{manifest_path}: 'files' must map file names to sha256 strings")
    if WEIGHTS not in files:
        raise BundleError(f"{manifest_path} lists no {WEIGHTS}")
    if not isinstance(manifest.get("model"), str):
        raise BundleError(f"{manifest_path}: 'model' must be a model's name, not {manifest.get('model')!r:.60}")
    try:
        model = build_model(manifest["model"])
    except KeyError as exc:
        raise BundleError(f"{manifest_path}: {exc}") from None
    # No file of the bundle (weights, int8 segment, bottleneck) can be larger than the whole
    # model's weights: anything larger is refused before it is read or hashed.
    limit = weights_limit(model)
    weights = b""
    for name, expected in files.items():
        file = root / name
        if Path(name).name != name or not file.is_file():
            raise BundleError(f"{root}: {name!r} listed in the manifest is missing or not a plain file name")
        try:
            if name == WEIGHTS:
                # Read once: what is hashed is what is loaded (reopening by name would load
                # whatever replaced the file in between).
                weights = read_regular_file(file, "bundle file", limit)
                actual = hashlib.sha256(weights).hexdigest()
            else:
                actual = hashlib.sha256(read_regular_file(file, "bundle file", limit)).hexdigest()
        except ValueError as exc:
            raise BundleError(f"{exc}; refusing to load") from None
        if actual != expected:
            raise BundleError(f"{file}: sha256 {actual} differs from {expected} in the manifest; refusing to load")
    if "architecture" in manifest:
        from .compress.architecture import rebuild
        from .compress.exits import with_exits

        try:
            cuts = manifest.get("exit_cuts", model.exit_cuts)
            if not isinstance(cuts, list) or not all(type(c) is int for c in cuts):
                raise ValueError(f"exit_cuts must be a list of cut indices, not {cuts!r:.60}")
            if not isinstance(manifest["architecture"], dict):
                raise ValueError("the architecture record must be an object of layer shapes")
            head = manifest.get("exit_head")
            if head is not None and not isinstance(head, str):
                raise ValueError(f"exit_head must be a name, not {head!r:.60}")
            if cuts != model.exit_cuts or head is not None:
                model = with_exits(model, cuts, head)
            rebuild(model, manifest["architecture"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BundleError(f"{manifest_path}: its architecture record does not rebuild {manifest['model']}: "
                              f"{exc}") from None
    name = manifest.get("name", model.name)
    if not isinstance(name, str) or not 0 < len(name) <= 200:
        raise BundleError(f"{manifest_path}: 'name' must be a model name of 1 to 200 characters, not {name!r:.60}")
    model.name = name
    try:
        state = load_safetensors_bytes(weights)
    except Exception as exc:  # safetensors raises its own error types on a malformed file
        raise BundleError(f"{root / WEIGHTS} is not a readable safetensors file: {exc}") from None
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:  # a model that answers NaN for every input must not be served
        raise BundleError(f"{root / WEIGHTS}: tensor {bad} holds NaN or Inf values; refusing to load")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise BundleError(f"{root / WEIGHTS} does not fit the model the manifest describes: "
                          f"{state_dict_mismatch(exc)}") from None
    model.eval()
    graph = trace(model, (torch.zeros(1, *model.input_shape),))
    if graph_hash(graph) != manifest.get("graph_sha256"):
        raise BundleError(f"{manifest_path}: the rebuilt {manifest['model']} traces to a different graph than the "
                          "bundle was made from (another edgesplit or torch version?); make the bundle again")
    return Bundle(root, manifest, model, graph)

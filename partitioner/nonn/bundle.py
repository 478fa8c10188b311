"""NoNN bundles: every member's student and the aggregator in one safetensors file, plus a
JSON manifest (partition, the filter statistics it came from, sizes, accuracy, sha256).

The manifest is what a node needs to rebuild a member before its weights load (the
filters of its part and the student widths), and what the device needs to aggregate.
Weights are verified against the manifest's sha256 before anything is loaded; no pickle.

Example::

    >>> from edgesplit.partitioner.nonn.bundle import load_ensemble
    >>> ensemble = load_ensemble("nonn_resnet_fm_s8_enhanced")      # sha256 checked first
    >>> ensemble.members, [len(part) for part in ensemble.partition.parts]
    (8, [16, 16, 16, 16])
    >>> ensemble.member_model_name(3)
    'nonn_resnet_fm_s8_enhanced.member.3'
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load

from edgesplit.models.weights_io import read_json_file, sha256_file, write_safetensors
from edgesplit.partitioner.flops import macs_of

from . import stats
from .partition import Partition, PartitionError
from .students import Aggregator, Student, StudentBank

log = logging.getLogger("edgesplit.nonn")

FORMAT = "edgesplit-nonn/1"
WEIGHTS_DIR = Path(__file__).parent / "weights"
MAX_WEIGHTS_BYTES = 256 << 20  # a NoNN bundle's weights (the shipped ones are a few MB)
INPUT_SHAPE = (1, 28, 28)


class NonnBundleError(ValueError):
    """A NoNN bundle that is missing, malformed, or does not match its weights."""


@dataclass
class Ensemble:
    """A loaded NoNN ensemble: standalone students, the aggregator, and the manifest."""

    name: str
    students: list[Student | None]  # None: a member this process did not load
    aggregator: Aggregator
    manifest: dict
    manifest_path: Path

    @property
    def partition(self) -> Partition:
        return self.aggregator.partition

    @property
    def members(self) -> int:
        return self.partition.members

    def member_model_name(self, member: int) -> str:
        return member_model_name(self.name, member)


def member_model_name(ensemble: str, member: int) -> str:
    """The name a node serves member ``member`` of ``ensemble`` under."""
    return f"{ensemble}.member.{member}"


def _size(module: torch.nn.Module, shape: tuple[int, ...] = INPUT_SHAPE) -> dict:
    macs, _ = macs_of(module.eval(), torch.zeros(1, *shape))
    return {"params": sum(p.numel() for p in module.parameters()), "macs": macs}


def save_ensemble(out_dir: str | Path, name: str, bank: StudentBank, aggregator: Aggregator, record: dict,
                  data) -> dict:
    """Write ``<name>.safetensors`` and ``<name>.json`` into ``out_dir``; return the manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    partition = bank.partition
    state: dict[str, torch.Tensor] = {}
    students = []
    for i in range(partition.members):
        student = bank.member(i)
        students.append(_size(student))
        state.update({f"member.{i}.{k}": v.detach().contiguous().clone() for k, v in student.state_dict().items()})
    state.update({f"aggregator.{k}": v.detach().contiguous().clone() for k, v in aggregator.state_dict().items()})
    weights = out_dir / f"{name}.safetensors"
    statistics = stats.summary(data.pooled, data.graph)
    write_safetensors(state, weights, metadata={"format": FORMAT, "name": name,
                                                **bound_to_weights(partition.to_dict(), statistics)})
    manifest = {
        "format": FORMAT,
        "name": name,
        "teacher": {"model": data.teacher_name, **_size(data.teacher)},
        "input_shape": list(INPUT_SHAPE),
        "num_classes": int(aggregator.classifier.out_features),
        "partition": partition.to_dict(),
        "statistics": statistics,
        "student": {"widths": list(bank.widths), "members": students},
        **record,
        "weights": weights.name,
        "sha256": sha256_file(weights),
    }
    (out_dir / f"{name}.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def bound_to_weights(partition: dict, statistics: dict) -> dict[str, str]:
    """Metadata that ties the manifest's partition and filter statistics to the weights file
    (whose sha256 the manifest records): a manifest edited to another partition loaded and
    classified at 10 % instead of 93 %, since the weights' hash alone did not cover it."""
    # as floats: a manifest rewritten by another JSON tool (0.0 written as 0) still matches
    kept = {k: [float(v) for v in statistics.get(k) or []] for k in ("pooled_mean", "pooled_std")}
    return {"partition": _canonical(partition),
            "statistics_sha256": hashlib.sha256(_canonical(kept).encode()).hexdigest()}


def _safetensors_metadata(raw: bytes) -> dict:
    """The ``__metadata__`` of a safetensors file held in ``raw`` (empty when it has none)."""
    try:
        size = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + size]) if 0 < size <= len(raw) - 8 else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def _check_statistics(manifest: dict, partition: Partition, path: Path) -> None:
    """The manifest's filter statistics: one finite mean and std >= 0 per filter."""
    import math

    stats_ = manifest.get("statistics")
    if not isinstance(stats_, dict):
        raise NonnBundleError(f"{path}: 'statistics' must be an object")
    for key in ("pooled_mean", "pooled_std"):
        values = stats_.get(key)
        if (not isinstance(values, list) or len(values) != partition.filters
                or not all(type(v) in (int, float) and math.isfinite(v) for v in values)):
            raise NonnBundleError(f"{path}: statistics.{key} must be {partition.filters} finite numbers")
    if any(v < 0 for v in stats_["pooled_std"]):
        raise NonnBundleError(f"{path}: statistics.pooled_std holds negative values")


def _manifest_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        return path
    if path.suffix == ".safetensors":
        return path.with_suffix(".json")
    shipped = WEIGHTS_DIR / f"{name_or_path}.json"
    if shipped.exists():
        return shipped
    raise NonnBundleError(
        f"no NoNN bundle {str(name_or_path)!r}: give a manifest path or one of {shipped_ensembles()}"
    )


def _same_shapes(build, state: dict[str, torch.Tensor], what: str) -> None:
    """ValueError unless the module ``build`` makes (built on the meta device: no memory) has
    exactly the tensors of ``state``, shape for shape."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build().state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        wrong = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
        raise ValueError(f"{what}: the manifest's architecture does not match the weights "
                         f"({', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''})")


def shipped_ensembles() -> list[str]:
    """Names of the NoNN ensembles committed with edgesplit."""
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.json"))


def load_ensemble(name_or_path: str | Path, members: list[int] | None = None) -> Ensemble:
    """Load a bundle (shipped name or manifest path), verifying its sha256.

    ``members`` restricts which students are built (a node serving one member needs one).
    """
    path = _manifest_path(name_or_path)
    try:
        manifest = read_json_file(path, "NoNN manifest")  # a regular file of bounded size only
    except ValueError as exc:
        raise NonnBundleError(str(exc)) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise NonnBundleError(f"{path}: not a NoNN manifest (format {FORMAT!r} expected)")
    name = str(manifest.get("weights", ""))
    if not name or Path(name).name != name or name in {".", ".."}:
        raise NonnBundleError(f"{path}: weights must be a file name beside the manifest, not {name!r:.80}")
    weights = path.parent / name
    if not weights.is_file():
        raise NonnBundleError(f"{path}: weights file {weights.name!r} is missing")
    if weights.stat().st_size > MAX_WEIGHTS_BYTES:  # checked before reading the file whole
        raise NonnBundleError(f"{weights}: {weights.stat().st_size:,} bytes, over the {MAX_WEIGHTS_BYTES:,} a "
                              "NoNN bundle may have")
    raw = weights.read_bytes()  # hashed and parsed from the same bytes: nothing can change in between
    actual = hashlib.sha256(raw).hexdigest()
    if actual != manifest.get("sha256"):
        raise NonnBundleError(f"{weights}: sha256 {actual} differs from the manifest's; refusing to load")
    try:
        partition = Partition.from_dict(manifest["partition"])
        widths = tuple(int(w) for w in manifest["student"]["widths"])
        num_classes = int(manifest["num_classes"])
    except (KeyError, TypeError, ValueError, PartitionError) as exc:
        raise NonnBundleError(f"{path}: malformed manifest: {exc}") from None
    if manifest.get("input_shape") != list(INPUT_SHAPE):
        raise NonnBundleError(f"{path}: input_shape must be {list(INPUT_SHAPE)}, not "
                              f"{manifest.get('input_shape')!r:.60}")
    _check_statistics(manifest, partition, path)
    meta = _safetensors_metadata(raw)
    if "partition" not in meta:  # saved before 2026-12-07: nothing to compare with
        log.warning("%s: its weights do not record the partition they were trained with; the manifest's is "
                    "taken unchecked (save the bundle again with this edgesplit)", path)
    else:
        expected = bound_to_weights(manifest["partition"], manifest["statistics"])
        for key in ("partition", "statistics_sha256"):
            if meta.get(key) != expected[key]:
                raise NonnBundleError(f"{path}: its {key.split('_')[0]} is not the one its weights were trained "
                                      "with (recorded in the weights file); refusing to load")
    wanted = list(range(partition.members)) if members is None else sorted(set(members))
    for i in wanted:
        if not 0 <= i < partition.members:
            raise NonnBundleError(f"{manifest.get('name')} has members 0..{partition.members - 1}, not {i}")
    try:
        state = load(raw)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise NonnBundleError(f"{weights}: not a safetensors file: {exc}") from None
    students: list[Student | None] = [None] * partition.members
    try:
        for i in wanted:
            prefix = f"member.{i}."
            own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            # The manifest's widths are checked against the (verified) weights on the meta
            # device first: a manifest naming huge widths must not allocate gigabytes.
            _same_shapes(lambda i=i: Student(len(partition.member_filters(i)), widths), own, f"member {i}")
            student = Student(len(partition.member_filters(i)), widths)
            student.load_state_dict(own)
            students[i] = student.eval()
        mean = state["aggregator.filter_mean"]
        own = {k[len("aggregator."):]: v for k, v in state.items() if k.startswith("aggregator.")}
        _same_shapes(lambda: Aggregator(partition, mean, num_classes), own, "the aggregator")
        aggregator = Aggregator(partition, mean, num_classes)
        aggregator.load_state_dict({k[len("aggregator."):]: v for k, v in state.items()
                                    if k.startswith("aggregator.")})
    except (KeyError, RuntimeError, ValueError) as exc:
        raise NonnBundleError(f"{weights}: weights do not match the manifest: {exc}") from None
    return Ensemble(str(manifest.get("name", path.stem)), students, aggregator.eval(), manifest, path)

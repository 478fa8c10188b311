"""The models a node serves: names, versions, tensor specs, batching settings and live stats.

A served model is anything that maps a list of batched float32 tensors to a list of
batched float32 tensors. A split model contributes one served model per segment:
``resnet_fm`` (the whole network) and ``resnet_fm.from.K`` (the tail after cut ``K``).
Several models can share one registry, so one node can serve several networks.

Example::

    >>> from edgesplit.models import build_model
    >>> registry = ModelRegistry()
    >>> names = register_split_model(registry, build_model("resnet_fm").eval())
    >>> names[:2]
    ['resnet_fm', 'resnet_fm.from.1']
    >>> registry.get("resnet_fm.from.4").inputs[0].shape
    (16, 28, 28)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch

from edgesplit.models.split_model import SplitModel
from edgesplit.runtime.codec import seconds_per_element
from edgesplit.runtime.inference import InferError

# Datatypes a float input accepts: FP32 as is, FP16 and INT8 with the codec parameters
# (see docs/protocol.md, "codec parameters").
FLOAT_INPUT_DATATYPES = ("FP32", "FP16", "INT8")
SERVED_VERSION = "1"
PLATFORM = "pytorch"  # eager PyTorch (not TorchScript, not ONNX)
_SHOWN_NAME = 64  # longest piece of a client-supplied name echoed in an error


def shown(name: object, limit: int = _SHOWN_NAME) -> str:
    """A client-supplied name as it may appear in an error message: quoted and bounded."""
    text = str(name)
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a served model: name, per-sample shape, accepted datatypes."""

    name: str
    shape: tuple[int, ...]
    datatypes: tuple[str, ...] = FLOAT_INPUT_DATATYPES


@dataclass(frozen=True)
class BatchingConfig:
    """How requests for one model are grouped into batches.

    A batch runs when a worker is free; it takes every queued request up to
    ``max_batch`` rows. While another batch of the node is running (the node is loaded),
    a free worker waits up to ``max_delay_s`` for the queue to reach ``preferred_batch``
    rows; an idle node never delays a request. ``enabled=False`` runs one request per batch.
    """

    enabled: bool = True
    preferred_batch: int = 32
    max_batch: int = 64
    max_delay_s: float = 0.002

    def __post_init__(self) -> None:
        if not 1 <= self.preferred_batch <= self.max_batch:
            raise ValueError(f"need 1 <= preferred_batch ({self.preferred_batch}) <= max_batch ({self.max_batch})")
        if not 0 <= self.max_delay_s <= 1.0:
            raise ValueError(f"max_delay_s must be within 0..1 s, not {self.max_delay_s}")


@dataclass
class ModelStats:
    """Running totals of one served model (read by the control plane's SegmentProfile)."""

    requests: int = 0
    batches: int = 0
    rows: int = 0
    compute_seconds: float = 0.0
    queue_seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add_batch(self, requests: int, rows: int, compute_seconds: float, queue_seconds: float) -> None:
        with self._lock:
            self.requests += requests
            self.batches += 1
            self.rows += rows
            self.compute_seconds += compute_seconds
            self.queue_seconds += queue_seconds

    @property
    def mean_batch(self) -> float:
        """Mean rows per executed batch (0 before the first batch)."""
        return self.rows / self.batches if self.batches else 0.0

    @property
    def mean_compute_seconds(self) -> float:
        """Mean compute time of the batches a request ran in."""
        return self.compute_seconds / self.batches if self.batches else 0.0


@dataclass
class ServedModel:
    """A model as the node serves it: ``run`` maps batched inputs to batched outputs."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    run: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    version: str = SERVED_VERSION
    platform: str = PLATFORM
    stats: ModelStats = field(default_factory=ModelStats)

    @cached_property
    def input_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.inputs)

    @cached_property
    def output_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.outputs)

    @cached_property
    def input_specs(self) -> dict[str, TensorSpec]:
        """Input specs by name (built once, read on every request)."""
        return {s.name: s for s in self.inputs}


class ModelRegistry:
    """Served models by name; resolution errors say what is served."""

    def __init__(self) -> None:
        self._models: dict[str, ServedModel] = {}
        self.split_models: dict[str, SplitModel] = {}  # networks whose segments are served
        self.graphs: dict[str, ServedGraph] = {}  # traced graphs whose cuts are served (bundles)

    def add(self, model: ServedModel) -> None:
        if model.name in self._models:
            raise ValueError(f"a model named {model.name!r} is already served")
        self._models[model.name] = model

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    def names(self) -> list[str]:
        return sorted(self._models)

    def get(self, name: str, version: str = "") -> ServedModel:
        """The served model ``name`` (version empty or served), else NOT_FOUND naming what is served."""
        model = self._models.get(name)
        if model is None:
            bases = sorted(self.split_models) or sorted(self._models)[:8]
            hint = ", ".join(f"{b} and {b}.from.K" for b in bases) if self.split_models else ", ".join(bases)
            raise InferError(InferError.NOT_FOUND, f"unknown model {shown(name)}; this node serves {hint}")
        if version and version != model.version:
            raise InferError(
                InferError.NOT_FOUND,
                f"model {model.name} has no version {shown(version, 16)}; served versions: {model.version}",
            )
        return model


def register_split_model(
    registry: ModelRegistry, model: SplitModel, batching: BatchingConfig | None = None
) -> list[str]:
    """Serve every segment of ``model``: the whole network and the tail after each cut."""
    model = model.eval()
    batching = batching or BatchingConfig()
    cuts = model.cut_points()
    output = (TensorSpec("logits", cuts[-1].shape, ("FP32",)),)
    names = []
    for cut in cuts[:-1]:
        name = model.name if cut.index == 0 else f"{model.name}.from.{cut.index}"
        registry.add(ServedModel(
            name=name,
            inputs=(TensorSpec("input", tuple(cut.shape)),),
            outputs=output,
            run=_segment_runner(model, cut.index),
            batching=replace(batching),
        ))
        names.append(name)
    registry.split_models[model.name] = model
    return names


def register_nonn_members(registry: ModelRegistry, ensemble, members: list[int] | None = None,
                          batching: BatchingConfig | None = None) -> list[str]:
    """Serve members of a NoNN ensemble (:class:`edgesplit.partitioner.nonn.bundle.Ensemble`) as ``NAME.member.I``.

    Each takes the image and answers its part's pooled features (``features``, one per filter).
    """
    batching = batching or BatchingConfig()
    names = []
    for i in members if members is not None else range(ensemble.members):
        student = ensemble.students[i]
        if student is None:
            raise ValueError(f"member {i} of {ensemble.name} was not loaded")
        name = ensemble.member_model_name(i)
        registry.add(ServedModel(
            name=name,
            inputs=(TensorSpec("input", tuple(ensemble.manifest["input_shape"])),),
            outputs=(TensorSpec("features", (student.filters,), ("FP32",)),),
            run=_student_runner(student.eval()),
            batching=replace(batching),
        ))
        names.append(name)
    return names


def _student_runner(student: torch.nn.Module) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    def run(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [student(tensors[0])]

    return run


def _segment_runner(model: SplitModel, start: int) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    def run(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [model.run(tensors[0], start)]

    return run


MAX_PROFILE_REPEATS = 50
MAX_CACHED_PROFILES = 8


class ServedGraph:
    """A traced graph whose cuts a node serves, and the per-node profiles taken of it here.

    :meth:`profile` measures on this node (the edge side of the partitioner's cost model)
    and keeps the result, so a controller asking again gets the same numbers at once.
    """

    def __init__(self, name: str, graph, example_inputs: tuple[torch.Tensor, ...]) -> None:
        self.name = name
        self.graph = graph
        self.example_inputs = example_inputs
        self._profiles: dict[tuple[int, int], str] = {}
        self._lock = threading.Lock()  # one profile at a time: two would time each other

    def profile(self, repeats: int = 9, batch: int = 1) -> str:
        """This graph's per-node profile on this host, as Profile JSON (cached per arguments)."""
        from edgesplit.partitioner.profile import profile_graph

        if not 1 <= repeats <= MAX_PROFILE_REPEATS:
            raise InferError(InferError.INVALID_ARGUMENT,
                             f"repeats must be within 1..{MAX_PROFILE_REPEATS}, not {repeats}")
        if not 1 <= batch <= 64:
            raise InferError(InferError.INVALID_ARGUMENT, f"batch must be within 1..64, not {batch}")
        key = (repeats, batch)
        cached = self._profiles.get(key)
        if cached is not None:
            return cached
        # One profile at a time, and none queued behind it: each takes a core for seconds,
        # which the node's inference needs more than a second caller does.
        if not self._lock.acquire(blocking=False):
            raise InferError(InferError.RESOURCE_EXHAUSTED, f"a profile of {self.name} is being taken; ask again "
                             "when it is done (answers come from a cache after that)", retry_after_s=1.0)
        try:
            if key not in self._profiles:
                profile = profile_graph(self.graph, self.example_inputs, batches=(batch,), repeats=repeats,
                                        warmup=2, model_name=self.name)
                profile.encode_seconds_per_element, profile.decode_seconds_per_element = seconds_per_element()
                if len(self._profiles) >= MAX_CACHED_PROFILES:
                    self._profiles.pop(next(iter(self._profiles)))
                self._profiles[key] = profile.to_json()
            return self._profiles[key]
        finally:
            self._lock.release()


def register_graph_cuts(registry: ModelRegistry, name: str, graph, batching: BatchingConfig | None = None,
                        indices: list[int] | None = None) -> list[str]:
    """Serve the tail after cuts of a traced graph (:func:`edgesplit.partitioner.graph.trace`).

    The tail after cut ``K`` is served as ``name.from.K`` (cut 0, the whole model, as
    ``name``); it takes one input per crossing tensor, named after the graph value, so a
    cut inside a residual or inception block travels as several inputs of one request,
    each with its own codec parameters. Cuts whose crossing values are not all tensors are
    skipped. ``indices`` limits which cuts are served (default: all that can travel).
    """
    from edgesplit.partitioner.cuts import enumerate_cuts, split

    batching = batching or BatchingConfig()
    cuts = enumerate_cuts(graph)
    output = cuts[-1].crossing_shapes
    example = tuple(torch.zeros(1, *s[1:]) for s in cuts[0].crossing_shapes)
    registry.graphs[name] = ServedGraph(name, graph, example)
    names = []
    for cut in cuts[:-1]:
        if not cut.transferable or (indices is not None and cut.index not in indices):
            continue
        _, tail = split(graph, cut.index)
        served = name if cut.index == 0 else f"{name}.from.{cut.index}"
        registry.add(ServedModel(
            name=served,
            inputs=tuple(TensorSpec(c, tuple(s[1:])) for c, s in zip(cut.crossing, cut.crossing_shapes)),
            outputs=tuple(TensorSpec(f"output{i}" if len(output) > 1 else "output", tuple(s[1:]), ("FP32",))
                          for i, s in enumerate(output)),
            run=_graph_runner(tail),
            batching=replace(batching),
        ))
        names.append(served)
    return names


def _graph_runner(tail) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    def run(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        out = tail(*tensors)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    return run

"""Device runner: run the head and its exits locally, offload the rest, never lose a request.

For each input the runner runs blocks up to the cut, checking every exit on the way; the
first exit whose confidence clears its threshold answers locally. Otherwise the tensor
crossing the cut is encoded and sent to a node with a deadline. If offloading fails for
any reason (deadline, unavailable, resource exhausted, open circuit) the runner completes
the request itself: the rest of the model, or the best exit it already computed, as
``fallback`` says. Every call returns exactly one :class:`Answer`.

Example::

    >>> import torch
    >>> from edgesplit.models import build_model
    >>> runner = DeviceRunner(build_model("resnet_fm").eval(), cut=4, thresholds=0.9, client=None)
    >>> runner.infer(torch.zeros(1, 1, 28, 28)).where
    'device-fallback'
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from edgesplit.models.split_model import SplitModel, confidence

from . import codec as codecs
from .metrics import DeviceMetrics
from .resilience import CircuitBreaker

WHERE_DEVICE = "device"  # answered by a local exit, or the plan runs everything locally
WHERE_EDGE = "edge"
WHERE_FALLBACK = "device-fallback"  # offloading failed; completed locally


class Offloader(Protocol):
    """What the runner needs of a client: run a tail segment on a node."""

    def infer(self, model_name: str, tensor: codecs.EncodedTensor, timeout: float, request_id: str = ""): ...


@dataclass
class Latency:
    """Where the time of one request went, in seconds."""

    device: float = 0.0
    transfer: float = 0.0
    edge: float = 0.0

    @property
    def total(self) -> float:
        return self.device + self.transfer + self.edge


@dataclass
class Answer:
    """The one answer to one request."""

    request_id: int
    prediction: int
    confidence: float
    exit: str  # "exit@K" or "final"
    where: str  # WHERE_DEVICE, WHERE_EDGE or WHERE_FALLBACK
    latency: Latency = field(default_factory=Latency)
    offload_error: str | None = None
    logits: torch.Tensor | None = None


class DeviceRunner:
    """Runs a split model's head on this device and offloads its tail."""

    def __init__(
        self,
        model: SplitModel,
        cut: int,
        thresholds: float | Mapping[int, float] = 1.01,
        client: Offloader | None = None,
        codec: str = "fp32",
        deadline_s: float = 0.5,
        fallback: str = "complete",
        breaker: CircuitBreaker | None = None,
        metrics: DeviceMetrics | None = None,
        latency_target_s: float | None = None,
    ) -> None:
        self.model = model.eval()
        self.cut = model.check_cut(cut)
        if codec not in codecs.CODECS:
            raise ValueError(f"codec must be one of {codecs.CODECS}, not {codec!r}")
        if fallback not in ("complete", "best_exit"):
            raise ValueError("fallback must be 'complete' (run the rest locally) or 'best_exit'")
        self.thresholds = self._thresholds(thresholds)
        self.client = client
        self.codec = codec
        self.deadline_s = deadline_s
        self.fallback = fallback
        self.breaker = breaker or CircuitBreaker()
        self.metrics = metrics
        self.latency_target_s = latency_target_s
        self._ids = itertools.count()
        # With a latency target, the offload deadline leaves room to complete locally in time.
        self.local_tail_s = self._measure_local_tail() if latency_target_s else 0.0

    def _measure_local_tail(self, repeats: int = 3) -> float:
        """Median time to run the tail on this device (what a fallback costs)."""
        h = torch.zeros(1, *self.model.cut_points()[self.cut].shape)
        times = []
        with torch.inference_mode():
            for _ in range(repeats):
                started = time.perf_counter()
                self.model.run(h, self.cut)
                times.append(time.perf_counter() - started)
        return sorted(times)[len(times) // 2]

    def offload_deadline(self, elapsed_s: float) -> float:
        """Seconds the node may take: fixed, or what the latency target leaves after the head
        and a local completion."""
        if self.latency_target_s is None:
            return self.deadline_s
        return max(0.005, self.latency_target_s - elapsed_s - self.local_tail_s)

    def _thresholds(self, thresholds: float | Mapping[int, float]) -> dict[int, float]:
        if isinstance(thresholds, Mapping):
            unknown = set(thresholds) - set(self.model.exit_cuts)
            if unknown:
                raise ValueError(f"no exits at cuts {sorted(unknown)}; exits are at {self.model.exit_cuts}")
            return {c: float(thresholds.get(c, 1.01)) for c in self.model.exit_cuts}
        return {c: float(thresholds) for c in self.model.exit_cuts}

    @property
    def tail_model_name(self) -> str:
        return self.model.name if self.cut == 0 else f"{self.model.name}.from.{self.cut}"

    def infer(self, x: torch.Tensor) -> Answer:
        """Answer one input (shape [1, *input_shape] or [*input_shape])."""
        request_id = next(self._ids)
        if x.dim() == len(self.model.input_shape):
            x = x.unsqueeze(0)
        answer = self._infer(request_id, x)
        if self.metrics:
            self.metrics.answers.labels(where=answer.where, exit=answer.exit).inc()
            for part in ("device", "transfer", "edge"):
                self.metrics.latency.labels(part=part).observe(getattr(answer.latency, part))
            self.metrics.latency.labels(part="total").observe(answer.latency.total)
        return answer

    def _infer(self, request_id: int, x: torch.Tensor) -> Answer:
        latency = Latency()
        started = time.perf_counter()
        seen: list[tuple[float, int, str, torch.Tensor]] = []
        with torch.inference_mode():
            h = x
            for index in range(1, self.cut + 1):
                h = self.model.blocks[index - 1](h)
                if index in self.thresholds:
                    logits = self.model.exit_logits(index, h)
                    conf, pred = confidence(logits)
                    seen.append((float(conf[0]), int(pred[0]), f"exit@{index}", logits))
                    if float(conf[0]) >= self.thresholds[index]:
                        latency.device = time.perf_counter() - started
                        return Answer(request_id, int(pred[0]), float(conf[0]), f"exit@{index}", WHERE_DEVICE,
                                      latency, logits=logits)
        if self.cut == self.model.num_blocks:
            latency.device = time.perf_counter() - started
            conf, pred = confidence(h)
            return Answer(request_id, int(pred[0]), float(conf[0]), "final", WHERE_DEVICE, latency, logits=h)

        error = "no edge client"
        if self.client is not None and self.breaker.allow():
            encoded = codecs.encode(h, self.codec)
            latency.device = time.perf_counter() - started
            call_started = time.perf_counter()
            try:
                deadline = self.offload_deadline(latency.device)
                result = self.client.infer(self.tail_model_name, encoded, deadline, str(request_id))
            except Exception as exc:  # any failure: complete locally
                latency.transfer = time.perf_counter() - call_started  # time lost on the attempt
                self.breaker.failure()
                error = getattr(exc, "reason", type(exc).__name__)
                if self.metrics:
                    self.metrics.offload_failures.labels(reason=error).inc()
            else:
                self.breaker.success()
                latency.edge = result.edge_seconds
                latency.transfer = max(0.0, result.round_trip_seconds - result.edge_seconds)
                if self.metrics:
                    self.metrics.sent_bytes.inc(result.sent_bytes)
                conf, pred = confidence(result.logits)
                return Answer(request_id, int(pred[0]), float(conf[0]), "final", WHERE_EDGE, latency,
                              logits=result.logits)
        elif self.client is not None:
            error = "circuit open"
            if self.metrics:
                self.metrics.offload_failures.labels(reason="CIRCUIT_OPEN").inc()
        return self._complete_locally(request_id, h, seen, latency, started, error)

    def _complete_locally(self, request_id, h, seen, latency, started, error) -> Answer:
        local_started = time.perf_counter()
        if self.fallback == "best_exit" and seen:
            conf, pred, name, logits = max(seen, key=lambda s: s[0])
        else:
            with torch.inference_mode():
                logits = self.model.run(h, self.cut)
            c, p = confidence(logits)
            conf, pred, name = float(c[0]), int(p[0]), "final"
        if latency.device == 0.0:
            latency.device = time.perf_counter() - started
        else:
            latency.device += time.perf_counter() - local_started
        return Answer(request_id, pred, conf, name, WHERE_FALLBACK, latency, offload_error=error, logits=logits)

"""Classify with a NoNN ensemble spread over nodes: ask every member at once, use whoever answers.

The input is encoded once and sent to every member's node concurrently. The client waits
until every member has answered or failed, or until the deadline, whichever comes first;
members still outstanding then are cancelled and counted missing (``DEADLINE_EXCEEDED``),
like members whose node refused or is down. The aggregator classifies with the answers it
has (replicas of a part averaged, lost parts at their training mean). If no member
answered, the device runs its own fallback student locally and classifies with it alone.
Every call returns exactly one :class:`EnsembleAnswer`, which says who answered.

Example::

    ensemble = load_ensemble("nonn_resnet_fm_s8_enhanced")
    clients = [EdgeClient(f"198.18.0.{11 + i}:8001") for i in range(ensemble.members)]
    nonn = EnsembleClient(ensemble, clients, deadline_s=0.2)
    answer = nonn.classify(images)      # answer.logits, answer.answered, answer.missing
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from edgesplit.runtime import codec
from edgesplit.runtime.inference import OffloadError, OffloadResult
from edgesplit.runtime.metrics import EnsembleMetrics


class PendingAnswer(Protocol):
    def done(self) -> bool: ...
    def add_done_callback(self, fn) -> None: ...
    def cancel(self) -> None: ...
    def result(self) -> OffloadResult: ...


class AsyncOffloader(Protocol):
    """What the ensemble client needs of a node client: start an offload, get a pending answer."""

    def infer_async(self, model_name: str, tensors: codec.EncodedTensor | Mapping[str, codec.EncodedTensor],
                    timeout: float, request_id: str = "") -> PendingAnswer: ...


@dataclass
class EnsembleAnswer:
    """The one answer to an ensemble request, and how it was reached."""

    logits: torch.Tensor
    answered: tuple[int, ...]
    missing: dict[int, str] = field(default_factory=dict)  # member -> reason
    fallback: bool = False
    seconds: float = 0.0
    sent_bytes: int = 0
    received_bytes: int = 0

    @property
    def how(self) -> str:
        if self.fallback:
            return "fallback"
        return "partial" if self.missing else "all"


class EnsembleClient:
    """A device's view of a NoNN ensemble: one node client per member, a deadline, a fallback.

    ``fallback_member`` is the student the device runs itself when nobody answers (its
    weights must be in ``ensemble``); ``None`` leaves the logits at the aggregator's
    all-missing guess (training means) with ``fallback=True``.
    """

    def __init__(self, ensemble, clients: Sequence[AsyncOffloader], deadline_s: float = 0.5,
                 input_codec: str = "int8", fallback_member: int | None = 0,
                 metrics: EnsembleMetrics | None = None) -> None:
        if len(clients) != ensemble.members:
            raise ValueError(f"{ensemble.name} has {ensemble.members} members; got {len(clients)} clients")
        if not deadline_s > 0:
            raise ValueError(f"the deadline must be > 0 s, not {deadline_s}")
        if input_codec not in codec.CODECS:
            raise ValueError(f"unknown codec {input_codec!r}; use one of {codec.CODECS}")
        if fallback_member is not None and (not 0 <= fallback_member < ensemble.members
                                            or ensemble.students[fallback_member] is None):
            raise ValueError(f"fallback member {fallback_member} is not loaded in {ensemble.name}")
        self.ensemble, self.clients, self.deadline_s = ensemble, list(clients), deadline_s
        self.input_codec, self.fallback_member = input_codec, fallback_member
        self.metrics = metrics
        self._ids = itertools.count()

    def classify(self, images: torch.Tensor, request_id: str = "") -> EnsembleAnswer:
        """Logits for normalised images [N, 1, 28, 28], from whichever members answer in time."""
        started = time.perf_counter()
        request_id = request_id or f"nonn-{next(self._ids)}"
        encoded = codec.encode(images, self.input_codec)
        members = self.ensemble.members
        finished = threading.Semaphore(0)
        pending: dict[int, PendingAnswer] = {}
        missing: dict[int, str] = {}
        for i, client in enumerate(self.clients):
            try:
                pending[i] = client.infer_async(self.ensemble.member_model_name(i), encoded,
                                                timeout=self.deadline_s, request_id=f"{request_id}.{i}")
            except OffloadError as exc:
                missing[i] = exc.reason
                continue
            pending[i].add_done_callback(lambda _p: finished.release())
        end = started + self.deadline_s
        for _ in range(len(pending)):
            if not finished.acquire(timeout=max(0.0, end - time.perf_counter())):
                break
        answers: dict[int, torch.Tensor] = {}
        received = 0
        for i, call in pending.items():
            if not call.done():
                call.cancel()
                missing[i] = "DEADLINE_EXCEEDED"
                continue
            try:
                result = call.result()
                features = result.logits
                if tuple(features.shape) != (len(images), len(self.ensemble.partition.member_filters(i))):
                    raise OffloadError("INTERNAL", f"member {i} answered shape {tuple(features.shape)}")
            except OffloadError as exc:
                missing[i] = exc.reason
                continue
            answers[i] = features
            received += features.numel() * 4
        fallback = not answers
        with torch.no_grad():
            if answers:
                logits = self.ensemble.aggregator.combine(answers)
            elif self.fallback_member is not None:
                local = self.ensemble.students[self.fallback_member]
                logits = self.ensemble.aggregator.combine({self.fallback_member: local(images)})
            else:
                widths = [len(self.ensemble.partition.member_filters(i)) for i in range(members)]
                logits = self.ensemble.aggregator([torch.zeros(len(images), w) for w in widths],
                                                  torch.zeros(len(images), members))
        answer = EnsembleAnswer(logits, tuple(sorted(answers)), dict(sorted(missing.items())), fallback,
                                time.perf_counter() - started, len(encoded.data) * len(pending), received)
        self._record(answer)
        return answer

    def _record(self, answer: EnsembleAnswer) -> None:
        if self.metrics is None:
            return
        name = self.ensemble.name
        self.metrics.answers.labels(ensemble=name, how=answer.how).inc()
        for member, reason in answer.missing.items():
            self.metrics.missing.labels(ensemble=name, member=str(member), reason=reason).inc()
        self.metrics.latency.labels(ensemble=name).observe(answer.seconds)
        self.metrics.sent_bytes.labels(ensemble=name).inc(answer.sent_bytes)

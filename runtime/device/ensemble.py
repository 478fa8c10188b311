"""Classify with a NoNN ensemble spread over nodes: ask every member at once, use whoever answers.

The input is encoded once and sent to every member's node concurrently. The client waits
until every member has answered or failed, or until the deadline, whichever comes first;
members still outstanding then are cancelled and counted missing (``DEADLINE_EXCEEDED``),
like members whose node refused or is down. The aggregator classifies with the answers it
has (replicas of a part averaged, lost parts at their training mean). If no member
answered, the device runs its own fallback student locally and classifies with it alone.
Every call returns exactly one :class:`EnsembleAnswer`, which says who answered (images it
cannot classify raise ValueError before anything is sent).

Example::

    ensemble = load_ensemble("nonn_resnet_fm_s8_enhanced")
    clients = [EdgeClient(f"198.18.0.{11 + i}:8001") for i in range(ensemble.members)]
    nonn = EnsembleClient(ensemble, clients, deadline_s=0.2)
    answer = nonn.classify(images)      # answer.logits, answer.answered, answer.missing
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from edgesplit.runtime import codec
from edgesplit.runtime.inference import OffloadError, OffloadResult
from edgesplit.runtime.metrics import EnsembleMetrics

from .breaker import CircuitBreaker

MAX_BATCH = 64  # rows per call: an edge-node's default max_batch

log = logging.getLogger("edgesplit.device.ensemble")
# A member's answer further above the teacher's training mean than this many standard
# deviations (of that filter's pooled activation) is taken as garbage, not as evidence.
ANSWER_BOUND_STDS = 50.0


# Normalised Fashion-MNIST images lie within about -0.8..2.1; beyond this bound they are not
# normalised (raw 0..255 pixels), and members' answers to them fail the plausibility check,
# which counted against healthy members.
MAX_NORMALISED = 100.0
MAX_REQUEST_ID = 240  # of the nodes' 256, room for the member suffix


def answer_bounds(ensemble) -> list[torch.Tensor]:
    """Per member, the largest plausible value of each answered feature (from the manifest's statistics)."""
    stats = ensemble.manifest.get("statistics", {})
    mean = torch.tensor(stats.get("pooled_mean") or [0.0] * ensemble.partition.filters)
    std = torch.tensor(stats.get("pooled_std") or [1.0] * ensemble.partition.filters)
    bound = mean + ANSWER_BOUND_STDS * std.clamp(min=1e-3) + 1.0
    return [bound[list(ensemble.partition.member_filters(i))] for i in range(ensemble.members)]


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
    seconds: float = 0.0
    sent_bytes: int = 0
    received_bytes: int = 0

    @property
    def fallback(self) -> bool:
        """Nobody answered: the logits come from the device's own fallback."""
        return not self.answered

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

    One circuit breaker per member: a member that failed twice in a row (down, hung past
    the deadline, or answering garbage) is not asked for ``breaker_reset_s``, then probed
    by one request, so a hung member stops costing every request the whole deadline
    (reason ``CIRCUIT_OPEN`` while it is skipped).
    """

    def __init__(self, ensemble, clients: Sequence[AsyncOffloader], deadline_s: float = 0.5,
                 input_codec: str = "int8", fallback_member: int | None = 0,
                 metrics: EnsembleMetrics | None = None, breaker_failures: int = 2,
                 breaker_reset_s: float = 0.5, max_batch: int = MAX_BATCH) -> None:
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
        self.max_batch = max_batch
        self._image_shape = tuple(ensemble.manifest.get("input_shape") or (1, 28, 28))
        self._ids = itertools.count()
        self._bounds = answer_bounds(ensemble)
        self.breakers = [CircuitBreaker(breaker_failures, breaker_reset_s) for _ in range(ensemble.members)]

    def check_members(self, timeout: float = 10.0) -> dict[int, str]:
        """Members whose node does not serve them from this ensemble's weights, with why.

        Answers of the right shape from another training run, or from another member, would
        be silently wrong, so a device checks once before it relies on its members: each
        node must serve this member's model name from weights with the ensemble's sha256.
        Clients that cannot report what they serve (no ``served``) are not checked.
        """
        want = self.ensemble.manifest.get("sha256", "")
        problems: dict[int, str] = {}
        for i, client in enumerate(self.clients):
            report = getattr(client, "served", None)
            if report is None:
                continue
            try:
                hashes, models = report(timeout)
            except OffloadError as exc:
                problems[i] = f"cannot tell what it serves: {exc.reason}"
                continue
            if want not in hashes:
                problems[i] = f"serves other weights ({', '.join(h[:12] for h in hashes) or 'none'})"
            elif self.ensemble.member_model_name(i) not in models:
                problems[i] = f"does not serve {self.ensemble.member_model_name(i)}"
        return problems

    def classify(self, images: torch.Tensor, request_id: str = "") -> EnsembleAnswer:
        """Logits for normalised images [N, 1, 28, 28], from whichever members answer in time.

        ValueError, before anything is sent, for images this ensemble cannot classify (another
        shape, more than ``max_batch`` rows, values that are not finite): the caller's mistake,
        which must neither reach the members (whose refusals would count against them) nor
        end in an error from deep inside the codec or the fallback student.
        """
        self._check_images(images)
        if len(request_id) > MAX_REQUEST_ID:  # each member's call adds ".K": the nodes refuse ids over 256
            raise ValueError(f"request_id of {len(request_id)} characters: at most {MAX_REQUEST_ID}")
        images = images.float()  # float16/64 inputs: the local fallback student computes in float32
        started = time.perf_counter()
        request_id = request_id or f"nonn-{next(self._ids)}"
        encoded = codec.encode(images, self.input_codec)
        finished = threading.Semaphore(0)
        pending: dict[int, PendingAnswer] = {}
        missing: dict[int, str] = {}
        settled: set[int] = set()  # members whose breaker has heard how their call ended

        def settle(member: int, error: OffloadError | None) -> None:
            # Success for the breaker (which also hands back a half-open breaker's probe) when
            # the member answered, shed load with its pushback, refused our request as
            # malformed (the request's fault, not the member's), or we cancelled the call.
            settled.add(member)
            if error is None or error.node_alive or error.reason == "CANCELLED":
                self.breakers[member].success()
            else:
                self.breakers[member].failure()

        try:
            for i, client in enumerate(self.clients):
                if not self.breakers[i].allow():
                    missing[i] = "CIRCUIT_OPEN"
                    continue
                try:
                    call = client.infer_async(self.ensemble.member_model_name(i), encoded,
                                              timeout=self.deadline_s, request_id=f"{request_id}.{i}")
                except OffloadError as exc:
                    missing[i] = exc.reason
                    settle(i, exc)
                    continue
                except Exception:  # noqa: BLE001 - a broken client (closed channel...) is a missing member
                    log.exception("member %d of %s: the request could not be sent", i, self.ensemble.name)
                    missing[i] = "CLIENT_ERROR"
                    settle(i, OffloadError("CLIENT_ERROR", "the request could not be sent"))
                    continue
                pending[i] = call
                call.add_done_callback(lambda _p: finished.release())
            end = started + self.deadline_s
            for _ in range(len(pending)):
                if not finished.acquire(timeout=max(0.0, end - time.perf_counter())):
                    break
            answers: dict[int, torch.Tensor] = {}
            received = 0
            for i, call in pending.items():
                if not call.done():
                    missing[i] = "DEADLINE_EXCEEDED"
                    settle(i, OffloadError("DEADLINE_EXCEEDED", "no answer within the deadline"))
                    continue
                try:
                    answers[i] = self._checked(i, call.result(), len(images))
                    received += answers[i].numel() * 4
                    settle(i, None)
                except OffloadError as exc:
                    missing[i] = exc.reason
                    settle(i, exc)
                except Exception:  # noqa: BLE001 - a broken client must not cost the request its answer
                    log.exception("member %d of %s: the answer could not be read", i, self.ensemble.name)
                    missing[i] = "CLIENT_ERROR"
                    settle(i, OffloadError("CLIENT_ERROR", "the answer could not be read"))
            logits = self._classify(answers, images)
        finally:
            for i, call in pending.items():  # whatever happened above, nothing is left running
                if not call.done():
                    call.cancel()
                if i not in settled:  # an unexpected error above: the slot a breaker lent goes back
                    settle(i, OffloadError("CLIENT_ERROR", "unexpected error"))
        answer = EnsembleAnswer(logits, tuple(sorted(answers)), dict(sorted(missing.items())),
                                time.perf_counter() - started, len(encoded.data) * len(pending), received)
        self._record(answer)
        return answer

    def _check_images(self, images: torch.Tensor) -> None:
        shape = self._image_shape
        if not isinstance(images, torch.Tensor) or images.dim() != 1 + len(shape) or tuple(images.shape[1:]) != shape:
            got = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"{self.ensemble.name} classifies images [N, {', '.join(map(str, shape))}], not {got}")
        if not 1 <= len(images) <= self.max_batch:
            raise ValueError(f"{len(images)} images: send 1 to {self.max_batch} per call (the nodes' batch limit)")
        if not images.is_floating_point() or not torch.isfinite(images).all():
            raise ValueError("images must be finite floating-point values (normalised as in training)")
        largest = float(images.abs().max())
        if largest > MAX_NORMALISED:  # raw pixels (0..255) or worse: refused here, not by the members
            raise ValueError(f"images hold values up to {largest:.4g}; normalised images (as to_tensor makes them) "
                             f"stay within +-{MAX_NORMALISED:g}")

    def _checked(self, member: int, result: OffloadResult, rows: int) -> torch.Tensor:
        """A member's answer if it is plausible, else OffloadError(INVALID_ANSWER).

        An honest answer is the mean of ReLU maps: never negative, and within
        :data:`ANSWER_BOUND_STDS` standard deviations of the teacher's training mean. One
        member that answers garbage must not decide the class.
        """
        features = result.logits
        want = (rows, len(self.ensemble.partition.member_filters(member)))
        if not isinstance(features, torch.Tensor) or tuple(features.shape) != want:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise OffloadError("INVALID_ANSWER", f"member {member} answered {shape}, expected {want}")
        features = features.float()
        if not torch.isfinite(features).all() or (features < 0).any() or (features > self._bounds[member]).any():
            raise OffloadError("INVALID_ANSWER", f"member {member} answered features outside their range")
        return features

    def _classify(self, answers: dict[int, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if answers:
                return self.ensemble.aggregator.combine(answers)
            if self.fallback_member is not None:
                local = self.ensemble.students[self.fallback_member]
                return self.ensemble.aggregator.combine({self.fallback_member: local(images)})
            aggregator = self.ensemble.aggregator  # every part at its training mean: the prior
            return aggregator.classifier(aggregator.filter_mean).expand(len(images), -1)

    def _record(self, answer: EnsembleAnswer) -> None:
        if self.metrics is None:
            return
        name = self.ensemble.name
        self.metrics.answers.labels(ensemble=name, how=answer.how).inc()
        for member, reason in answer.missing.items():
            self.metrics.missing.labels(ensemble=name, member=str(member), reason=reason).inc()
        self.metrics.latency.labels(ensemble=name).observe(answer.seconds)
        self.metrics.sent_bytes.labels(ensemble=name).inc(answer.sent_bytes)

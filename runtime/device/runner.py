"""Device runner: run the head and its exits locally, offload the rest, never lose a request.

For each input the runner reads the plan in force once (:class:`~edgesplit.runtime.plan.Plan`:
cut, thresholds, codec, epoch), runs blocks up to the cut, checking on the way every exit
whose threshold can be met (exits set above 1 are skipped, not computed); the first exit
whose confidence clears its threshold answers locally. Otherwise the tensor crossing the
cut is encoded and sent to a node with a deadline. If offloading fails (the codec cannot
carry the tensor, deadline, unavailable, resource exhausted, every node's circuit open)
the runner completes the request itself: the rest of the model, or the best exit it
already computed, as ``fallback`` says. Every call returns exactly one :class:`Answer`,
which carries the epoch of the plan it ran under.

**Racing a late offload.** Under a plan that carries its own offload deadline (a
controller's, predicted from the link) and with ``fallback="complete"``, a deadline that
passes does not abandon the offload: the runner starts the tail on the device, block by
block, while the offload goes on (until twice the deadline); the edge's answer is taken if
it arrives before the device has finished, the device's otherwise (``Answer.raced``). A link
that is slow rather than dead then costs the wait for its answer, not the deadline plus the
whole tail. The offload runs in a helper thread for these plans only (``race_limit_s``
bounds how long a late one goes on, by default as long again as its deadline); elsewhere
the call is made in the caller's thread, as before.

Circuit breaking is the offloader's job (one breaker per node in
:class:`~edgesplit.runtime.device.failover.FailoverClient`); a bare client is wrapped in a
``FailoverClient`` of one, so there is exactly one breaker per node and none above it.

Example::

    >>> import torch
    >>> from edgesplit.models import build_model
    >>> runner = DeviceRunner(build_model("resnet_fm").eval(), cut=4, thresholds=0.9, client=None)
    >>> runner.infer(torch.zeros(1, 1, 28, 28)).where
    'device-fallback'
    >>> runner.set_plan(runner.plan.with_changes(cut=7)).epoch
    1
"""

from __future__ import annotations

import itertools
import logging
import numbers
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import torch

from edgesplit.models.split_model import CONFIDENCES, SplitModel, confidence
from edgesplit.runtime import codec as codecs
from edgesplit.runtime.inference import OffloadError
from edgesplit.runtime.metrics import DeviceMetrics
from edgesplit.runtime.plan import NEVER, Plan

from .failover import FailoverClient, Offloader

log = logging.getLogger("edgesplit.device")

WHERE_DEVICE = "device"  # answered by a local exit, or the plan runs everything locally
WHERE_EDGE = "edge"
WHERE_FALLBACK = "device-fallback"  # offloading failed; completed locally
RACE_THREADS = 4  # offloads through the racing helper threads at once; beyond that one is made as before


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
    epoch: int = 0  # the plan this request ran under
    sent_bytes: int = 0  # what was offloaded (0 when nothing was)
    attempted_bytes: int = 0  # what an offload that failed tried to send
    cut: int = 0  # the plan's cut this request ran under
    raced: bool = False  # the offload was late: the device ran the tail meanwhile (see the module docstring)
    cold: bool = False  # the offload (or its attempt) opened the connection first: its time holds the handshakes


def _seconds(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a positive, finite number of seconds, not {value!r}")
    return float(value)


def _is_zero(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == 0


class DeviceRunner:
    """Runs a split model's head on this device and offloads its tail, under a swappable plan."""

    def __init__(
        self,
        model: SplitModel,
        cut: int | None = None,
        thresholds: float | Mapping[int, float] = NEVER,
        client: Offloader | None = None,
        codec: str = "fp32",
        deadline_s: float = 0.5,
        fallback: str = "complete",
        metrics: DeviceMetrics | None = None,
        latency_target_s: float | None = None,
        plan: Plan | None = None,
        compression: str = "none",
        confidence_kind: str = "max_softmax",
        race: bool = True,
        race_limit_s: float | None = None,
    ) -> None:
        self.model = model.eval()
        if confidence_kind not in CONFIDENCES:
            raise ValueError(f"confidence_kind must be one of {CONFIDENCES}, not {confidence_kind!r}")
        self.confidence_kind = confidence_kind
        if fallback not in ("complete", "best_exit"):
            raise ValueError("fallback must be 'complete' (run the rest locally) or 'best_exit'")
        if plan is None:
            if cut is None:
                raise ValueError("give a cut (or a plan)")
            if codec not in codecs.CODECS:
                raise ValueError(f"codec must be one of {codecs.CODECS}, not {codec!r}")
            plan = Plan(cut, self._thresholds(thresholds), codec, compression, epoch=0)
        if client is not None and not isinstance(client, FailoverClient):
            client = FailoverClient([client])
        self.client = client
        self.deadline_s = _seconds("deadline_s", deadline_s)
        self.fallback = fallback
        self.metrics = metrics
        self.latency_target_s = None if latency_target_s is None else _seconds("latency_target_s", latency_target_s)
        if race_limit_s is not None:
            race_limit_s = 0.0 if _is_zero(race_limit_s) else _seconds("race_limit_s", race_limit_s)
        self.race = race
        # how long a late offload may go on after its deadline (None: as long again as the
        # deadline; 0: no longer, as without racing)
        self.race_limit_s = race_limit_s
        self._racing = threading.BoundedSemaphore(RACE_THREADS)
        self._racing_count = 0  # offloads handed to the race pool and not yet ended
        self._race_pool: ThreadPoolExecutor | None = None
        self._ids = itertools.count()
        self._local_tail: dict[int, float] = {}
        self._tail_lock = threading.Lock()
        self._state = self._prepare(plan)
        self.observers: list[Callable[[Answer], None]] = []
        self.observer_errors = 0  # observers that raised (logged; the answers were returned)
        if latency_target_s:
            self.local_tail_seconds(self._plan.cut)

    # -- plan ---------------------------------------------------------------------------
    @property
    def plan(self) -> Plan:
        """The plan in force (read once per request)."""
        return self._plan

    def set_plan(self, plan: Plan) -> Plan:
        """Swap in ``plan`` atomically: requests already running finish under the old one."""
        self._state = self._prepare(plan)
        if self.metrics:
            self.metrics.plan_epoch.set(plan.epoch)
            self.metrics.plan_cut.set(plan.cut)
            self.metrics.plan_codec.clear()
            self.metrics.plan_codec.labels(codec=plan.codec).set(1)
            for exit_cut in self.model.exit_cuts:
                self.metrics.plan_threshold.labels(exit=str(exit_cut)).set(plan.threshold(exit_cut))
        return plan

    @property
    def cut(self) -> int:
        return self._plan.cut

    @property
    def codec(self) -> str:
        return self._plan.codec

    @property
    def thresholds(self) -> dict[int, float]:
        return {c: self._plan.threshold(c) for c in self.model.exit_cuts}

    @property
    def _plan(self) -> Plan:
        return self._state[0]

    def _prepare(self, plan: Plan) -> tuple[Plan, frozenset[int], frozenset[int]]:
        """Check ``plan`` against the model and work out, once per plan rather than per request,
        which exits before its cut are checked and which are skipped (they cannot fire)."""
        self.model.check_cut(plan.cut)
        exits = self.model.exit_cuts
        unknown = set(plan.thresholds) - set(exits)
        if unknown:
            raise ValueError(f"no exits at cuts {sorted(unknown)}; exits are at {exits}")
        active = frozenset(plan.active_exits(exits=exits))
        skipped = frozenset(e for e in exits if e <= plan.cut) - active
        return plan, active, skipped

    def _thresholds(self, thresholds: float | Mapping[int, float]) -> dict[int, float]:
        if isinstance(thresholds, Mapping):
            unknown = set(thresholds) - set(self.model.exit_cuts)
            if unknown:
                raise ValueError(f"no exits at cuts {sorted(unknown)}; exits are at {self.model.exit_cuts}")
            return {c: float(thresholds.get(c, NEVER)) for c in self.model.exit_cuts}
        return {c: float(thresholds) for c in self.model.exit_cuts}

    # -- deadlines ------------------------------------------------------------------------
    def local_tail_seconds(self, cut: int, repeats: int = 3) -> float:
        """Median time to run the tail after ``cut`` on this device (what a fallback costs); cached."""
        with self._tail_lock:
            if cut not in self._local_tail:
                h = torch.zeros(1, *self.model.cut_points()[cut].shape)
                times = []
                with torch.inference_mode():
                    for _ in range(repeats):
                        started = time.perf_counter()
                        self.model.run(h, cut)
                        times.append(time.perf_counter() - started)
                self._local_tail[cut] = sorted(times)[len(times) // 2]
            return self._local_tail[cut]

    @property
    def local_tail_s(self) -> float:
        return self.local_tail_seconds(self._plan.cut) if self.latency_target_s else 0.0

    def offload_deadline(self, elapsed_s: float, cut: int | None = None, plan: Plan | None = None) -> float:
        """Seconds the node may take: fixed, or what the latency target leaves after the head
        and a local completion; no more than ``plan``'s own offload deadline where it sets one."""
        if self.latency_target_s is None:
            seconds = self.deadline_s
        else:
            tail = self.local_tail_seconds(self._plan.cut if cut is None else cut)
            seconds = max(0.005, self.latency_target_s - elapsed_s - tail)
        if plan is not None and plan.offload_deadline_s is not None:
            seconds = min(seconds, plan.offload_deadline_s)
        return seconds

    @staticmethod
    def tail_model_name_for(model: SplitModel, cut: int) -> str:
        return model.name if cut == 0 else f"{model.name}.from.{cut}"

    @property
    def tail_model_name(self) -> str:
        return self.tail_model_name_for(self.model, self._plan.cut)

    # -- requests -------------------------------------------------------------------------
    def infer(self, x: torch.Tensor) -> Answer:
        """Answer one input (shape [1, *input_shape] or [*input_shape])."""
        x = self._checked_input(x)
        request_id = next(self._ids)
        state = self._state
        answer = self._infer(request_id, x, *state)
        answer.cut = state[0].cut
        if answer.raced and self.metrics:
            self.metrics.races.labels(winner="edge" if answer.where == WHERE_EDGE else "device").inc()
        for observe in self.observers:
            try:
                observe(answer)  # the embedded controller learns from every answer
            except Exception:  # the answer is computed: a failing observer must not lose it
                self.observer_errors += 1
                if self.observer_errors == 1 or self.observer_errors % 1000 == 0:
                    log.exception("an observer of the runner failed (%d so far); the answer is returned",
                                  self.observer_errors)
        if self.metrics:
            self.metrics.answers.labels(where=answer.where, exit=answer.exit).inc()
            for part in ("device", "transfer", "edge"):
                self.metrics.latency.labels(part=part).observe(getattr(answer.latency, part))
            self.metrics.latency.labels(part="total").observe(answer.latency.total)
        return answer

    def _checked_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as one float32 row [1, *input_shape], or a ValueError (TypeError) saying what
        is wrong, before any work: one answer is about one input (its exits decide for it)."""
        shape = tuple(self.model.input_shape)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"infer() takes a torch.Tensor of shape {list(shape)} or [1, *that], "
                            f"not {type(x).__module__}.{type(x).__name__}")
        if tuple(x.shape) == shape:
            x = x.unsqueeze(0)
        elif tuple(x.shape) != (1, *shape):
            raise ValueError(f"infer() answers one input of shape {list(shape)} (or [1, *that]), not "
                             f"{list(x.shape)}: give a batch one row at a time")
        if not x.is_floating_point():
            raise ValueError(f"infer() needs floating-point values (the normalised input), not {x.dtype}")
        # NaN or infinite values are answered (locally where the codec cannot carry them)
        return x if x.dtype == torch.float32 else x.float()

    def _infer(self, request_id: int, x: torch.Tensor, plan: Plan, active: frozenset[int],
               skippable: frozenset[int]) -> Answer:
        latency = Latency()
        started = time.perf_counter()
        seen: list[tuple[float, int, str, torch.Tensor]] = []
        skipped: list[tuple[int, torch.Tensor]] = []  # exits that cannot fire: computed only for a best_exit fallback
        with torch.inference_mode():
            h = x
            for index in range(1, plan.cut + 1):
                h = self.model.blocks[index - 1](h)
                if index in skippable:
                    skipped.append((index, h))
                elif index in active:
                    logits = self.model.exit_logits(index, h)
                    conf, pred = confidence(logits, self.confidence_kind)
                    seen.append((float(conf[0]), int(pred[0]), f"exit@{index}", logits))
                    if float(conf[0]) >= plan.threshold(index):
                        latency.device = time.perf_counter() - started
                        return Answer(request_id, int(pred[0]), float(conf[0]), f"exit@{index}", WHERE_DEVICE,
                                      latency, logits=logits, epoch=plan.epoch)
        if plan.cut == self.model.num_blocks:
            latency.device = time.perf_counter() - started
            conf, pred = confidence(h, self.confidence_kind)
            return Answer(request_id, int(pred[0]), float(conf[0]), "final", WHERE_DEVICE, latency, logits=h,
                          epoch=plan.epoch)
        if self.client is None:
            return self._complete_locally(request_id, h, seen, latency, started, "no edge client", plan,
                                          skipped=skipped)
        try:
            encoded = codecs.encode(h, plan.codec, plan.compression)
        except codecs.CodecError as exc:
            self._count_failure("CODEC")
            log.debug("request %d: codec %s cannot carry the tensor (%s); completing locally",
                      request_id, plan.codec, exc)
            return self._complete_locally(request_id, h, seen, latency, started, f"CODEC: {exc}", plan,
                                          skipped=skipped)
        latency.device = time.perf_counter() - started
        call_started = time.perf_counter()
        expect = (h.shape[0], self.model.num_classes)  # the answer a node must give: logits, one row each
        cold = False  # the attempt opened the connection first: its time holds the handshakes
        try:
            deadline = self.offload_deadline(latency.device, plan.cut, plan)
            name = self.tail_model_name_for(self.model, plan.cut)
            if self._races(plan):
                # A late offload the device overtook has no result to say so: read it before the
                # call. Otherwise the client that made the attempt says so on its result or error.
                cold = not getattr(self.client, "connected", True)
                result = self._offload_racing(name, encoded, deadline, request_id, h, plan.cut, expect)
            else:
                result = self.client.infer(name, encoded, deadline, str(request_id), expect=expect)
            got = result.result if isinstance(result, _LateAnswer) else result
            if not isinstance(got, _DeviceFinished) and tuple(got.logits.shape) != expect:
                # a client that does not check (a user's offloader): the answer is still refused
                raise OffloadError("INVALID_ANSWER", f"node answered a {list(got.logits.shape)} tensor, "
                                                     f"expected {list(expect)}")
        except OffloadError as exc:
            latency.transfer = time.perf_counter() - call_started  # time lost on the attempt
            self._count_failure(exc.reason)
            answer = self._complete_locally(request_id, h, seen, latency, started, exc.reason, plan, resumed=True,
                                            skipped=skipped)
            answer.attempted_bytes, answer.cold = len(encoded.data), getattr(exc, "cold", False)
            return answer
        except Exception as exc:  # a bug, not a network failure: say so loudly, still answer once
            latency.transfer = time.perf_counter() - call_started
            log.exception("request %d: offloading raised %s; completing locally", request_id, type(exc).__name__)
            self._count_failure("INTERNAL_ERROR")
            return self._complete_locally(request_id, h, seen, latency, started,
                                          f"INTERNAL_ERROR: {type(exc).__name__}", plan, resumed=True,
                                          skipped=skipped)
        if isinstance(result, _DeviceFinished):  # a late offload, and the device finished first
            latency.transfer = result.waited_s
            latency.device += result.compute_s
            self._count_failure("DEADLINE_EXCEEDED")
            conf, pred = confidence(result.logits, self.confidence_kind)
            return Answer(request_id, int(pred[0]), float(conf[0]), "final", WHERE_FALLBACK, latency,
                          offload_error="DEADLINE_EXCEEDED: late; the device finished the tail first",
                          logits=result.logits, epoch=plan.epoch, attempted_bytes=len(encoded.data), raced=True,
                          cold=cold)
        raced = isinstance(result, _LateAnswer)
        if raced:
            result = result.result
            # noticed between two blocks of the device's tail: the block in progress counts too
            latency.device += max(0.0, time.perf_counter() - call_started - result.round_trip_seconds)
        latency.edge = result.edge_seconds
        latency.transfer = max(0.0, result.round_trip_seconds - result.edge_seconds)
        if self.metrics:
            self.metrics.sent_bytes.inc(result.sent_bytes)
        conf, pred = confidence(result.logits, self.confidence_kind)
        return Answer(request_id, int(pred[0]), float(conf[0]), "final", WHERE_EDGE, latency,
                      logits=result.logits, epoch=plan.epoch, sent_bytes=result.sent_bytes, raced=raced,
                      cold=getattr(result, "cold", False))

    def close(self) -> None:
        """Stop the racing helper threads (late offloads still out end at their own deadlines)."""
        if self._race_pool is not None:
            self._race_pool.shutdown(wait=False)

    # -- racing a late offload ------------------------------------------------------------
    @property
    def offloads_racing(self) -> int:
        """Offloads made through the racing helper threads (see the module docstring) not yet ended."""
        return self._racing_count

    @property
    def races_late_offloads(self) -> bool:
        """Whether a late offload under a plan with its own deadline is raced, not abandoned."""
        return self.race and self.fallback == "complete"

    def _races(self, plan: Plan) -> bool:
        return self.races_late_offloads and plan.offload_deadline_s is not None

    def _offload_racing(self, name: str, encoded, deadline: float, request_id: int, h: torch.Tensor, cut: int,
                        expect: tuple[int, ...]):
        """Offload; past ``deadline``, run the tail here meanwhile and take whichever ends first.

        Returns the edge's result (a :class:`_LateAnswer` when it came after the deadline) or
        a :class:`_DeviceFinished`; raises OffloadError as ``client.infer`` does when the
        offload fails before the deadline."""
        if not self._racing.acquire(blocking=False):  # too many late offloads pending: as without racing
            return self.client.infer(name, encoded, deadline, str(request_id), expect=expect)
        if self._race_pool is None:
            with self._tail_lock:
                if self._race_pool is None:
                    self._race_pool = ThreadPoolExecutor(RACE_THREADS, thread_name_prefix="offload")
        try:
            limit = deadline + (deadline if self.race_limit_s is None else self.race_limit_s)
            future = self._race_pool.submit(self.client.infer, name, encoded, limit, str(request_id), expect=expect)
        except RuntimeError:  # the pool is shut down (interpreter exit): offload in this thread
            self._racing.release()
            return self.client.infer(name, encoded, deadline, str(request_id), expect=expect)
        with self._tail_lock:
            self._racing_count += 1
        future.add_done_callback(self._race_ended)
        waited = time.perf_counter()
        try:
            return future.result(timeout=deadline)
        except FutureTimeout:
            pass
        waited = time.perf_counter() - waited
        computed = time.perf_counter()
        y = h
        with torch.inference_mode():
            for index in range(cut, self.model.num_blocks):
                if _succeeded(future):
                    return _LateAnswer(future.result())
                y = self.model.blocks[index](y)
        return _DeviceFinished(y, waited, time.perf_counter() - computed)

    def _race_ended(self, future: Future) -> None:
        with self._tail_lock:
            self._racing_count -= 1
        self._racing.release()
        if not future.cancelled() and future.exception() is not None:
            exc = future.exception()
            if not isinstance(exc, OffloadError):  # a bug in the offloader, not the network: say so
                log.error("a raced offload raised %s: %s", type(exc).__name__, exc)

    def _count_failure(self, reason: str) -> None:
        if self.metrics:
            self.metrics.offload_failures.labels(reason=reason).inc()

    def _complete_locally(self, request_id, h, seen, latency, started, error, plan, resumed=False,
                          skipped=()) -> Answer:
        local_started = time.perf_counter()
        if self.fallback == "best_exit" and skipped:
            with torch.inference_mode():
                for index, hx in skipped:
                    logits = self.model.exit_logits(index, hx)
                    conf, pred = confidence(logits, self.confidence_kind)
                    seen = [*seen, (float(conf[0]), int(pred[0]), f"exit@{index}", logits)]
        if self.fallback == "best_exit" and seen:
            conf, pred, name, logits = max(seen, key=lambda s: s[0])
        else:
            with torch.inference_mode():
                logits = self.model.run(h, plan.cut)
            c, p = confidence(logits, self.confidence_kind)
            conf, pred, name = float(c[0]), int(p[0]), "final"
        if resumed:
            latency.device += time.perf_counter() - local_started
        else:
            latency.device = time.perf_counter() - started
        return Answer(request_id, pred, conf, name, WHERE_FALLBACK, latency, offload_error=error, logits=logits,
                      epoch=plan.epoch)


def _succeeded(future: Future) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


@dataclass
class _LateAnswer:
    """The edge's answer to an offload that passed its deadline, taken before the device finished."""

    result: object  # OffloadResult


@dataclass
class _DeviceFinished:
    """The tail computed on the device while a late offload was still out."""

    logits: torch.Tensor
    waited_s: float  # the deadline waited before the device started
    compute_s: float

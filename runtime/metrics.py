"""Prometheus metrics of an edge node and a device runner, on a registry you can pass in.

Names follow Prometheus conventions: ``edgesplit_`` prefix, base units (seconds, bytes),
``_total`` counters, histogram buckets that fit Raspberry-Pi-class latencies.

Example::

    >>> from prometheus_client import CollectorRegistry
    >>> m = NodeMetrics(CollectorRegistry())
    >>> m.requests.labels(model="resnet_fm", code="OK").inc()
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

# 0.5 ms .. 10 s: an edge tail takes milliseconds, a Pi-class full model up to seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class NodeMetrics:
    """Metrics of one edge node's data plane."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = REGISTRY if registry is None else registry
        self.registry = registry
        self.request_seconds = Histogram(
            "edgesplit_node_request_duration_seconds",
            "Time from receiving an inference request to answering it.",
            ["model"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.compute_seconds = Histogram(
            "edgesplit_node_compute_duration_seconds",
            "Model execution time of one batch on the node.",
            ["model"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.received_bytes = Counter(
            "edgesplit_node_received_bytes_total", "Tensor payload bytes received.", ["model"], registry=registry
        )
        self.sent_bytes = Counter(
            "edgesplit_node_sent_bytes_total", "Tensor payload bytes sent in answers.", ["model"], registry=registry
        )
        self.requests = Counter(
            "edgesplit_node_requests_total", "Inference requests answered, by gRPC status code.",
            ["model", "code"], registry=registry,
        )
        self.inflight = Gauge(
            "edgesplit_node_inflight_requests", "Inference requests queued or running now.", registry=registry
        )
        self.batch_size = Histogram(
            "edgesplit_node_batch_size", "Rows in each batch the node ran.",
            ["model"], buckets=BATCH_BUCKETS, registry=registry,
        )
        self.queue_seconds = Histogram(
            "edgesplit_node_queue_wait_seconds", "Time a request waited in its model's queue before its batch ran.",
            ["model"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self._children: dict[tuple[str, ...], object] = {}

    def child(self, metric: str, *labels: str):
        """``getattr(self, metric).labels(*labels)``, looked up once: a request updates
        several labelled series, and prometheus_client's ``labels`` takes a lock each time.
        Label values are served model names (or "unknown") and status codes: few."""
        key = (metric, *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = getattr(self, metric).labels(*labels)
        return found


class DeviceMetrics:
    """Metrics of a device runner: where requests ran and how long each part took."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = REGISTRY if registry is None else registry
        self.registry = registry
        self.answers = Counter(
            "edgesplit_device_answers_total", "Requests answered, by where they were computed and which exit.",
            ["where", "exit"], registry=registry,
        )
        self.offload_failures = Counter(
            "edgesplit_device_offload_failures_total", "Offload attempts that failed, by reason.",
            ["reason"], registry=registry,
        )
        self.latency = Histogram(
            "edgesplit_device_request_duration_seconds", "End-to-end latency of a request, by part.",
            ["part"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.sent_bytes = Counter(
            "edgesplit_device_sent_bytes_total", "Encoded tensor bytes offloaded.", registry=registry
        )
        self.races = Counter(
            "edgesplit_device_offload_races_total",
            "Offloads past their deadline raced with the tail on the device, by which answered first.",
            ["winner"], registry=registry,
        )
        self.plan_epoch = Gauge(
            "edgesplit_device_plan_epoch", "Epoch of the plan in force on the device.", registry=registry
        )
        self.plan_cut = Gauge("edgesplit_device_plan_cut", "Cut of the plan in force (blocks on the device).",
                              registry=registry)
        self.plan_codec = Gauge("edgesplit_device_plan_codec_info", "Codec of the plan in force (1 for it).",
                                ["codec"], registry=registry)
        self.plan_threshold = Gauge("edgesplit_device_plan_exit_threshold",
                                    "Confidence an exit needs under the plan in force (above 1: never taken).",
                                    ["exit"], registry=registry)
        self.bandwidth = Gauge("edgesplit_device_estimated_bandwidth_bits_per_second",
                               "Bandwidth to the edge estimated from real transfers.", registry=registry)
        self.rtt = Gauge("edgesplit_device_estimated_rtt_seconds", "Round-trip time estimated from real transfers.",
                         registry=registry)
        self.battery = Gauge("edgesplit_device_battery_ratio", "Battery level, 0 to 1.", registry=registry)
        self.on_battery = Gauge("edgesplit_device_on_battery", "1 on battery, 0 on mains power.", registry=registry)
        self.decisions = Counter("edgesplit_device_controller_decisions_total",
                                 "Plan changes applied on the device, made by its embedded controller or "
                                 "a cluster controller.", registry=registry)
        self.device_time_scale = Gauge("edgesplit_device_time_scale_ratio",
                                       "What the controller scales the device profile by at the cut in force: "
                                       "observed over predicted device time (at least 1 until the cut has "
                                       "answers of its own).",
                                       registry=registry)


class ControllerMetrics:
    """Metrics of a cluster controller (``edgesplit controller --metrics-port``): what it hears,
    what it decides, and per device the plan in force and the estimate it was decided on
    (a device label for each of at most ``max_devices`` devices; a forgotten one's are removed)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = REGISTRY if registry is None else registry
        self.registry = registry
        self.telemetry = Counter("edgesplit_controller_telemetry_total",
                                 "Telemetry messages acted on, by kind (device or node); of a flood, each "
                                 "source's latest per poll.", ["kind"], registry=registry)
        self.malformed = Gauge("edgesplit_controller_malformed_messages",
                               "Messages dropped since the start: unparsable, out of range, or beyond the tables.",
                               registry=registry)
        self.decisions = Counter("edgesplit_controller_decisions_total", "Plan changes published.", registry=registry)
        self.devices = Gauge("edgesplit_controller_devices", "Devices the controller keeps.", registry=registry)
        self.nodes = Gauge("edgesplit_controller_nodes", "Edge nodes the controller keeps.", registry=registry)
        self.plan_cut = Gauge("edgesplit_controller_plan_cut", "Cut of the plan in force, per device.", ["device"],
                              registry=registry)
        self.plan_epoch = Gauge("edgesplit_controller_plan_epoch", "Epoch of the plan in force, per device.",
                                ["device"], registry=registry)
        self.bandwidth = Gauge("edgesplit_controller_device_bandwidth_bits_per_second",
                               "The device's bandwidth estimate, as it last reported.", ["device"], registry=registry)
        self.rtt = Gauge("edgesplit_controller_device_rtt_seconds", "The device's RTT estimate, as it last reported.",
                         ["device"], registry=registry)
        self.battery = Gauge("edgesplit_controller_device_battery_ratio", "The device's battery level, 0 to 1.",
                             ["device"], registry=registry)
        self._per_device = (self.plan_cut, self.plan_epoch, self.bandwidth, self.rtt, self.battery)

    def forget(self, device: str) -> None:
        for gauge in self._per_device:
            try:
                gauge.remove(device)
            except KeyError:
                pass


class EnsembleMetrics:
    """Metrics of a device classifying with a NoNN ensemble: answers, missing members, fallbacks."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = REGISTRY if registry is None else registry
        self.registry = registry
        self.answers = Counter(
            "edgesplit_nonn_answers_total",
            "Requests answered, by how: every member, some members, or the device's fallback alone.",
            ["ensemble", "how"], registry=registry,
        )
        self.missing = Counter(
            "edgesplit_nonn_member_missing_total", "Member answers missing from a request, by member and reason.",
            ["ensemble", "member", "reason"], registry=registry,
        )
        self.latency = Histogram(
            "edgesplit_nonn_request_duration_seconds", "End-to-end latency of an ensemble request.",
            ["ensemble"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.sent_bytes = Counter(
            "edgesplit_nonn_sent_bytes_total", "Encoded input bytes sent to members.", ["ensemble"], registry=registry
        )

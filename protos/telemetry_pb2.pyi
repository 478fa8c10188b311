from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Telemetry(_message.Message):
    __slots__ = ("source", "time", "seq", "link", "battery", "resources", "node")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    LINK_FIELD_NUMBER: _ClassVar[int]
    BATTERY_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    source: str
    time: float
    seq: int
    link: LinkObservation
    battery: Battery
    resources: Resources
    node: NodeLoad
    def __init__(self, source: _Optional[str] = ..., time: _Optional[float] = ..., seq: _Optional[int] = ..., link: _Optional[_Union[LinkObservation, _Mapping]] = ..., battery: _Optional[_Union[Battery, _Mapping]] = ..., resources: _Optional[_Union[Resources, _Mapping]] = ..., node: _Optional[_Union[NodeLoad, _Mapping]] = ...) -> None: ...

class LinkObservation(_message.Message):
    __slots__ = ("bandwidth_mbit", "rtt_seconds", "samples", "drops")
    BANDWIDTH_MBIT_FIELD_NUMBER: _ClassVar[int]
    RTT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DROPS_FIELD_NUMBER: _ClassVar[int]
    bandwidth_mbit: float
    rtt_seconds: float
    samples: int
    drops: int
    def __init__(self, bandwidth_mbit: _Optional[float] = ..., rtt_seconds: _Optional[float] = ..., samples: _Optional[int] = ..., drops: _Optional[int] = ...) -> None: ...

class Battery(_message.Message):
    __slots__ = ("level", "on_battery", "simulated")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    ON_BATTERY_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_FIELD_NUMBER: _ClassVar[int]
    level: float
    on_battery: bool
    simulated: bool
    def __init__(self, level: _Optional[float] = ..., on_battery: _Optional[bool] = ..., simulated: _Optional[bool] = ...) -> None: ...

class Resources(_message.Message):
    __slots__ = ("cpu_percent", "memory_bytes")
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    cpu_percent: float
    memory_bytes: float
    def __init__(self, cpu_percent: _Optional[float] = ..., memory_bytes: _Optional[float] = ...) -> None: ...

class NodeLoad(_message.Message):
    __slots__ = ("queue_depth", "segment_seconds")
    class SegmentSecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    queue_depth: int
    segment_seconds: _containers.ScalarMap[str, float]
    def __init__(self, queue_depth: _Optional[int] = ..., segment_seconds: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("device", "controller", "epoch", "cut", "thresholds", "codec", "reason", "predicted_seconds", "time", "confidence")
    class ThresholdsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CUT_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    device: str
    controller: str
    epoch: int
    cut: int
    thresholds: _containers.ScalarMap[int, float]
    codec: str
    reason: str
    predicted_seconds: float
    time: float
    confidence: str
    def __init__(self, device: _Optional[str] = ..., controller: _Optional[str] = ..., epoch: _Optional[int] = ..., cut: _Optional[int] = ..., thresholds: _Optional[_Mapping[int, float]] = ..., codec: _Optional[str] = ..., reason: _Optional[str] = ..., predicted_seconds: _Optional[float] = ..., time: _Optional[float] = ..., confidence: _Optional[str] = ...) -> None: ...

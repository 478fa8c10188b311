from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CutInfo(_message.Message):
    __slots__ = ("index", "name", "shape", "datatype")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    datatype: str
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., datatype: _Optional[str] = ...) -> None: ...

class NodeInfoResponse(_message.Message):
    __slots__ = ("node_name", "version", "model_name", "weights_sha256", "cuts", "codecs", "max_inflight", "max_batch", "served_models")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    CUTS_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    MAX_INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    SERVED_MODELS_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    version: str
    model_name: str
    weights_sha256: str
    cuts: _containers.RepeatedCompositeFieldContainer[CutInfo]
    codecs: _containers.RepeatedScalarFieldContainer[str]
    max_inflight: int
    max_batch: int
    served_models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_name: _Optional[str] = ..., version: _Optional[str] = ..., model_name: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., cuts: _Optional[_Iterable[_Union[CutInfo, _Mapping]]] = ..., codecs: _Optional[_Iterable[str]] = ..., max_inflight: _Optional[int] = ..., max_batch: _Optional[int] = ..., served_models: _Optional[_Iterable[str]] = ...) -> None: ...

class SegmentProfileRequest(_message.Message):
    __slots__ = ("model_name",)
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    def __init__(self, model_name: _Optional[str] = ...) -> None: ...

class SegmentProfile(_message.Message):
    __slots__ = ("model_name", "requests", "mean_seconds", "mean_batch")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MEAN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEAN_BATCH_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    requests: int
    mean_seconds: float
    mean_batch: float
    def __init__(self, model_name: _Optional[str] = ..., requests: _Optional[int] = ..., mean_seconds: _Optional[float] = ..., mean_batch: _Optional[float] = ...) -> None: ...

class SegmentProfileResponse(_message.Message):
    __slots__ = ("profiles",)
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    profiles: _containers.RepeatedCompositeFieldContainer[SegmentProfile]
    def __init__(self, profiles: _Optional[_Iterable[_Union[SegmentProfile, _Mapping]]] = ...) -> None: ...

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
    __slots__ = ("node_name", "version", "model_name", "weights_sha256", "cuts", "codecs", "max_inflight", "max_batch", "served_models", "models", "workers", "intra_op_threads", "graphs")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    CUTS_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    MAX_INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    SERVED_MODELS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    INTRA_OP_THREADS_FIELD_NUMBER: _ClassVar[int]
    GRAPHS_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    version: str
    model_name: str
    weights_sha256: str
    cuts: _containers.RepeatedCompositeFieldContainer[CutInfo]
    codecs: _containers.RepeatedScalarFieldContainer[str]
    max_inflight: int
    max_batch: int
    served_models: _containers.RepeatedScalarFieldContainer[str]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    workers: int
    intra_op_threads: int
    graphs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_name: _Optional[str] = ..., version: _Optional[str] = ..., model_name: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., cuts: _Optional[_Iterable[_Union[CutInfo, _Mapping]]] = ..., codecs: _Optional[_Iterable[str]] = ..., max_inflight: _Optional[int] = ..., max_batch: _Optional[int] = ..., served_models: _Optional[_Iterable[str]] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., workers: _Optional[int] = ..., intra_op_threads: _Optional[int] = ..., graphs: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "inputs", "outputs", "batching", "preferred_batch", "max_batch", "max_queue_delay_seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    inputs: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    batching: bool
    preferred_batch: int
    max_batch: int
    max_queue_delay_seconds: float
    def __init__(self, name: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., batching: _Optional[bool] = ..., preferred_batch: _Optional[int] = ..., max_batch: _Optional[int] = ..., max_queue_delay_seconds: _Optional[float] = ...) -> None: ...

class TensorInfo(_message.Message):
    __slots__ = ("name", "shape", "datatypes", "codecs")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATATYPES_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    datatypes: _containers.RepeatedScalarFieldContainer[str]
    codecs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., datatypes: _Optional[_Iterable[str]] = ..., codecs: _Optional[_Iterable[str]] = ...) -> None: ...

class SegmentProfileRequest(_message.Message):
    __slots__ = ("model_name",)
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    def __init__(self, model_name: _Optional[str] = ...) -> None: ...

class SegmentProfile(_message.Message):
    __slots__ = ("model_name", "requests", "mean_seconds", "mean_batch", "batches", "mean_queue_seconds")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MEAN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEAN_BATCH_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    MEAN_QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    requests: int
    mean_seconds: float
    mean_batch: float
    batches: int
    mean_queue_seconds: float
    def __init__(self, model_name: _Optional[str] = ..., requests: _Optional[int] = ..., mean_seconds: _Optional[float] = ..., mean_batch: _Optional[float] = ..., batches: _Optional[int] = ..., mean_queue_seconds: _Optional[float] = ...) -> None: ...

class SegmentProfileResponse(_message.Message):
    __slots__ = ("profiles",)
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    profiles: _containers.RepeatedCompositeFieldContainer[SegmentProfile]
    def __init__(self, profiles: _Optional[_Iterable[_Union[SegmentProfile, _Mapping]]] = ...) -> None: ...

class GraphProfileRequest(_message.Message):
    __slots__ = ("graph_name", "repeats", "batch")
    GRAPH_NAME_FIELD_NUMBER: _ClassVar[int]
    REPEATS_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    graph_name: str
    repeats: int
    batch: int
    def __init__(self, graph_name: _Optional[str] = ..., repeats: _Optional[int] = ..., batch: _Optional[int] = ...) -> None: ...

class GraphProfileResponse(_message.Message):
    __slots__ = ("profile_json",)
    PROFILE_JSON_FIELD_NUMBER: _ClassVar[int]
    profile_json: str
    def __init__(self, profile_json: _Optional[str] = ...) -> None: ...

from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    DATA_TYPE_FLOAT16: _ClassVar[DataType]
    DATA_TYPE_BFLOAT16: _ClassVar[DataType]
    DATA_TYPE_FLOAT32: _ClassVar[DataType]
    DATA_TYPE_FLOAT64: _ClassVar[DataType]
    DATA_TYPE_INT8: _ClassVar[DataType]
    DATA_TYPE_UINT8: _ClassVar[DataType]
    DATA_TYPE_INT16: _ClassVar[DataType]
    DATA_TYPE_INT32: _ClassVar[DataType]
    DATA_TYPE_INT64: _ClassVar[DataType]
    DATA_TYPE_BOOL: _ClassVar[DataType]

class VerifyStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERIFY_STATUS_UNSPECIFIED: _ClassVar[VerifyStatus]
    VERIFY_STATUS_OK: _ClassVar[VerifyStatus]
    VERIFY_STATUS_DEVIATION: _ClassVar[VerifyStatus]
    VERIFY_STATUS_INPUT_MISMATCH: _ClassVar[VerifyStatus]
    VERIFY_STATUS_RECORD_ALTERED: _ClassVar[VerifyStatus]
    VERIFY_STATUS_NOT_CAPTURED: _ClassVar[VerifyStatus]
    VERIFY_STATUS_ERROR: _ClassVar[VerifyStatus]
    VERIFY_STATUS_CHAIN_BROKEN: _ClassVar[VerifyStatus]
DATA_TYPE_UNSPECIFIED: DataType
DATA_TYPE_FLOAT16: DataType
DATA_TYPE_BFLOAT16: DataType
DATA_TYPE_FLOAT32: DataType
DATA_TYPE_FLOAT64: DataType
DATA_TYPE_INT8: DataType
DATA_TYPE_UINT8: DataType
DATA_TYPE_INT16: DataType
DATA_TYPE_INT32: DataType
DATA_TYPE_INT64: DataType
DATA_TYPE_BOOL: DataType
VERIFY_STATUS_UNSPECIFIED: VerifyStatus
VERIFY_STATUS_OK: VerifyStatus
VERIFY_STATUS_DEVIATION: VerifyStatus
VERIFY_STATUS_INPUT_MISMATCH: VerifyStatus
VERIFY_STATUS_RECORD_ALTERED: VerifyStatus
VERIFY_STATUS_NOT_CAPTURED: VerifyStatus
VERIFY_STATUS_ERROR: VerifyStatus
VERIFY_STATUS_CHAIN_BROKEN: VerifyStatus

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class NoneValue(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ValueList(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Value]
    def __init__(self, items: _Optional[_Iterable[_Union[Value, _Mapping]]] = ...) -> None: ...

class ValueEntry(_message.Message):
    __slots__ = ("key", "value")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: Value
    def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...

class ValueMap(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[ValueEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[ValueEntry, _Mapping]]] = ...) -> None: ...

class Value(_message.Message):
    __slots__ = ("none_value", "bool_value", "int_value", "float_value", "string_value", "tensor_value", "list_value", "tuple_value", "dict_value")
    NONE_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    FLOAT_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_VALUE_FIELD_NUMBER: _ClassVar[int]
    LIST_VALUE_FIELD_NUMBER: _ClassVar[int]
    TUPLE_VALUE_FIELD_NUMBER: _ClassVar[int]
    DICT_VALUE_FIELD_NUMBER: _ClassVar[int]
    none_value: NoneValue
    bool_value: bool
    int_value: int
    float_value: float
    string_value: str
    tensor_value: Tensor
    list_value: ValueList
    tuple_value: ValueList
    dict_value: ValueMap
    def __init__(self, none_value: _Optional[_Union[NoneValue, _Mapping]] = ..., bool_value: _Optional[bool] = ..., int_value: _Optional[int] = ..., float_value: _Optional[float] = ..., string_value: _Optional[str] = ..., tensor_value: _Optional[_Union[Tensor, _Mapping]] = ..., list_value: _Optional[_Union[ValueList, _Mapping]] = ..., tuple_value: _Optional[_Union[ValueList, _Mapping]] = ..., dict_value: _Optional[_Union[ValueMap, _Mapping]] = ...) -> None: ...

class AuditContext(_message.Message):
    __slots__ = ("run_id", "step", "rank", "micro_batch", "tags", "session")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    step: int
    rank: int
    micro_batch: int
    tags: _containers.ScalarMap[str, str]
    session: str
    def __init__(self, run_id: _Optional[str] = ..., step: _Optional[int] = ..., rank: _Optional[int] = ..., micro_batch: _Optional[int] = ..., tags: _Optional[_Mapping[str, str]] = ..., session: _Optional[str] = ...) -> None: ...

class Autocast(_message.Message):
    __slots__ = ("enabled", "device_type", "dtype")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    device_type: str
    dtype: DataType
    def __init__(self, enabled: _Optional[bool] = ..., device_type: _Optional[str] = ..., dtype: _Optional[_Union[DataType, str]] = ...) -> None: ...

class ComputeRequest(_message.Message):
    __slots__ = ("loss", "params", "args", "kwargs", "grad_paths", "grad_output", "request_id", "audit", "autocast", "grad_grads", "grad_output_batched")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    KWARGS_FIELD_NUMBER: _ClassVar[int]
    GRAD_PATHS_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIT_FIELD_NUMBER: _ClassVar[int]
    AUTOCAST_FIELD_NUMBER: _ClassVar[int]
    GRAD_GRADS_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUT_BATCHED_FIELD_NUMBER: _ClassVar[int]
    loss: str
    params: ValueMap
    args: _containers.RepeatedCompositeFieldContainer[Value]
    kwargs: ValueMap
    grad_paths: _containers.RepeatedScalarFieldContainer[str]
    grad_output: Tensor
    request_id: str
    audit: AuditContext
    autocast: Autocast
    grad_grads: _containers.RepeatedCompositeFieldContainer[Gradient]
    grad_output_batched: bool
    def __init__(self, loss: _Optional[str] = ..., params: _Optional[_Union[ValueMap, _Mapping]] = ..., args: _Optional[_Iterable[_Union[Value, _Mapping]]] = ..., kwargs: _Optional[_Union[ValueMap, _Mapping]] = ..., grad_paths: _Optional[_Iterable[str]] = ..., grad_output: _Optional[_Union[Tensor, _Mapping]] = ..., request_id: _Optional[str] = ..., audit: _Optional[_Union[AuditContext, _Mapping]] = ..., autocast: _Optional[_Union[Autocast, _Mapping]] = ..., grad_grads: _Optional[_Iterable[_Union[Gradient, _Mapping]]] = ..., grad_output_batched: _Optional[bool] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("decode_ns", "compute_ns", "encode_ns")
    DECODE_NS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_NS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_NS_FIELD_NUMBER: _ClassVar[int]
    decode_ns: int
    compute_ns: int
    encode_ns: int
    def __init__(self, decode_ns: _Optional[int] = ..., compute_ns: _Optional[int] = ..., encode_ns: _Optional[int] = ...) -> None: ...

class Gradient(_message.Message):
    __slots__ = ("path", "grad")
    PATH_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    path: str
    grad: Tensor
    def __init__(self, path: _Optional[str] = ..., grad: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ComputeResponse(_message.Message):
    __slots__ = ("loss", "grads", "components", "non_finite", "notes", "device", "timings", "lossd_version", "request_id", "audited")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    NON_FINITE_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    LOSSD_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    AUDITED_FIELD_NUMBER: _ClassVar[int]
    loss: Value
    grads: _containers.RepeatedCompositeFieldContainer[Gradient]
    components: ValueMap
    non_finite: bool
    notes: _containers.RepeatedScalarFieldContainer[str]
    device: str
    timings: Timings
    lossd_version: str
    request_id: str
    audited: bool
    def __init__(self, loss: _Optional[_Union[Value, _Mapping]] = ..., grads: _Optional[_Iterable[_Union[Gradient, _Mapping]]] = ..., components: _Optional[_Union[ValueMap, _Mapping]] = ..., non_finite: _Optional[bool] = ..., notes: _Optional[_Iterable[str]] = ..., device: _Optional[str] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., lossd_version: _Optional[str] = ..., request_id: _Optional[str] = ..., audited: _Optional[bool] = ...) -> None: ...

class ComputeStreamRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ComputeStreamResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ParamInfo(_message.Message):
    __slots__ = ("name", "type", "required", "default_value", "nullable", "choices", "minimum", "minimum_exclusive", "maximum", "maximum_exclusive", "doc")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VALUE_FIELD_NUMBER: _ClassVar[int]
    NULLABLE_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    MINIMUM_FIELD_NUMBER: _ClassVar[int]
    MINIMUM_EXCLUSIVE_FIELD_NUMBER: _ClassVar[int]
    MAXIMUM_FIELD_NUMBER: _ClassVar[int]
    MAXIMUM_EXCLUSIVE_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    required: bool
    default_value: Value
    nullable: bool
    choices: _containers.RepeatedCompositeFieldContainer[Value]
    minimum: float
    minimum_exclusive: bool
    maximum: float
    maximum_exclusive: bool
    doc: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., required: _Optional[bool] = ..., default_value: _Optional[_Union[Value, _Mapping]] = ..., nullable: _Optional[bool] = ..., choices: _Optional[_Iterable[_Union[Value, _Mapping]]] = ..., minimum: _Optional[float] = ..., minimum_exclusive: _Optional[bool] = ..., maximum: _Optional[float] = ..., maximum_exclusive: _Optional[bool] = ..., doc: _Optional[str] = ...) -> None: ...

class InputInfo(_message.Message):
    __slots__ = ("name", "kind", "dtypes", "shape", "differentiable", "optional", "doc", "forms", "keyword")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DIFFERENTIABLE_FIELD_NUMBER: _ClassVar[int]
    OPTIONAL_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    FORMS_FIELD_NUMBER: _ClassVar[int]
    KEYWORD_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    dtypes: _containers.RepeatedScalarFieldContainer[DataType]
    shape: _containers.RepeatedScalarFieldContainer[str]
    differentiable: bool
    optional: bool
    doc: str
    forms: _containers.RepeatedCompositeFieldContainer[InputForm]
    keyword: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., dtypes: _Optional[_Iterable[_Union[DataType, str]]] = ..., shape: _Optional[_Iterable[str]] = ..., differentiable: _Optional[bool] = ..., optional: _Optional[bool] = ..., doc: _Optional[str] = ..., forms: _Optional[_Iterable[_Union[InputForm, _Mapping]]] = ..., keyword: _Optional[str] = ...) -> None: ...

class InputForm(_message.Message):
    __slots__ = ("kind", "dtypes", "shape", "same_shape", "broadcast_to", "broadcasts_with", "same_dtype", "shapes", "index_of", "index_background", "index_ignore", "values_min", "values_max", "items", "each", "keys", "min_items", "when", "label", "upstream", "promote_with", "length")
    KIND_FIELD_NUMBER: _ClassVar[int]
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SAME_SHAPE_FIELD_NUMBER: _ClassVar[int]
    BROADCAST_TO_FIELD_NUMBER: _ClassVar[int]
    BROADCASTS_WITH_FIELD_NUMBER: _ClassVar[int]
    SAME_DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPES_FIELD_NUMBER: _ClassVar[int]
    INDEX_OF_FIELD_NUMBER: _ClassVar[int]
    INDEX_BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    INDEX_IGNORE_FIELD_NUMBER: _ClassVar[int]
    VALUES_MIN_FIELD_NUMBER: _ClassVar[int]
    VALUES_MAX_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    EACH_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    MIN_ITEMS_FIELD_NUMBER: _ClassVar[int]
    WHEN_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    PROMOTE_WITH_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    kind: str
    dtypes: _containers.RepeatedScalarFieldContainer[DataType]
    shape: _containers.RepeatedScalarFieldContainer[str]
    same_shape: str
    broadcast_to: str
    broadcasts_with: str
    same_dtype: str
    shapes: _containers.RepeatedCompositeFieldContainer[ShapeOf]
    index_of: str
    index_background: bool
    index_ignore: _containers.RepeatedScalarFieldContainer[str]
    values_min: float
    values_max: float
    items: _containers.RepeatedCompositeFieldContainer[InputSchema]
    each: _containers.RepeatedCompositeFieldContainer[InputForm]
    keys: _containers.RepeatedCompositeFieldContainer[InputKey]
    min_items: int
    when: _containers.RepeatedCompositeFieldContainer[FormCondition]
    label: str
    upstream: str
    promote_with: str
    length: str
    def __init__(self, kind: _Optional[str] = ..., dtypes: _Optional[_Iterable[_Union[DataType, str]]] = ..., shape: _Optional[_Iterable[str]] = ..., same_shape: _Optional[str] = ..., broadcast_to: _Optional[str] = ..., broadcasts_with: _Optional[str] = ..., same_dtype: _Optional[str] = ..., shapes: _Optional[_Iterable[_Union[ShapeOf, _Mapping]]] = ..., index_of: _Optional[str] = ..., index_background: _Optional[bool] = ..., index_ignore: _Optional[_Iterable[str]] = ..., values_min: _Optional[float] = ..., values_max: _Optional[float] = ..., items: _Optional[_Iterable[_Union[InputSchema, _Mapping]]] = ..., each: _Optional[_Iterable[_Union[InputForm, _Mapping]]] = ..., keys: _Optional[_Iterable[_Union[InputKey, _Mapping]]] = ..., min_items: _Optional[int] = ..., when: _Optional[_Iterable[_Union[FormCondition, _Mapping]]] = ..., label: _Optional[str] = ..., upstream: _Optional[str] = ..., promote_with: _Optional[str] = ..., length: _Optional[str] = ...) -> None: ...

class InputSchema(_message.Message):
    __slots__ = ("forms",)
    FORMS_FIELD_NUMBER: _ClassVar[int]
    forms: _containers.RepeatedCompositeFieldContainer[InputForm]
    def __init__(self, forms: _Optional[_Iterable[_Union[InputForm, _Mapping]]] = ...) -> None: ...

class InputKey(_message.Message):
    __slots__ = ("name", "forms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORMS_FIELD_NUMBER: _ClassVar[int]
    name: str
    forms: _containers.RepeatedCompositeFieldContainer[InputForm]
    def __init__(self, name: _Optional[str] = ..., forms: _Optional[_Iterable[_Union[InputForm, _Mapping]]] = ...) -> None: ...

class ShapeOf(_message.Message):
    __slots__ = ("path", "shape")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    path: str
    shape: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, path: _Optional[str] = ..., shape: _Optional[_Iterable[str]] = ...) -> None: ...

class FormCondition(_message.Message):
    __slots__ = ("param", "value")
    PARAM_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    param: str
    value: Value
    def __init__(self, param: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...

class LossInfo(_message.Message):
    __slots__ = ("name", "families", "summary", "params", "inputs", "reference", "example")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILIES_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    families: _containers.RepeatedScalarFieldContainer[str]
    summary: str
    params: _containers.RepeatedCompositeFieldContainer[ParamInfo]
    inputs: _containers.RepeatedCompositeFieldContainer[InputInfo]
    reference: str
    example: str
    def __init__(self, name: _Optional[str] = ..., families: _Optional[_Iterable[str]] = ..., summary: _Optional[str] = ..., params: _Optional[_Iterable[_Union[ParamInfo, _Mapping]]] = ..., inputs: _Optional[_Iterable[_Union[InputInfo, _Mapping]]] = ..., reference: _Optional[str] = ..., example: _Optional[str] = ...) -> None: ...

class ListLossesRequest(_message.Message):
    __slots__ = ("family",)
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    family: str
    def __init__(self, family: _Optional[str] = ...) -> None: ...

class ListLossesResponse(_message.Message):
    __slots__ = ("losses",)
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    losses: _containers.RepeatedCompositeFieldContainer[LossInfo]
    def __init__(self, losses: _Optional[_Iterable[_Union[LossInfo, _Mapping]]] = ...) -> None: ...

class DescribeLossRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DescribeLossResponse(_message.Message):
    __slots__ = ("loss",)
    LOSS_FIELD_NUMBER: _ClassVar[int]
    loss: LossInfo
    def __init__(self, loss: _Optional[_Union[LossInfo, _Mapping]] = ...) -> None: ...

class ChunkedTensor(_message.Message):
    __slots__ = ("path", "size_bytes")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    path: str
    size_bytes: int
    def __init__(self, path: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class ChunkedRequestHeader(_message.Message):
    __slots__ = ("request", "tensors")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    request: ComputeRequest
    tensors: _containers.RepeatedCompositeFieldContainer[ChunkedTensor]
    def __init__(self, request: _Optional[_Union[ComputeRequest, _Mapping]] = ..., tensors: _Optional[_Iterable[_Union[ChunkedTensor, _Mapping]]] = ...) -> None: ...

class ComputeChunkedRequest(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ChunkedRequestHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[ChunkedRequestHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ChunkedResponseHeader(_message.Message):
    __slots__ = ("response", "tensors")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    response: ComputeResponse
    tensors: _containers.RepeatedCompositeFieldContainer[ChunkedTensor]
    def __init__(self, response: _Optional[_Union[ComputeResponse, _Mapping]] = ..., tensors: _Optional[_Iterable[_Union[ChunkedTensor, _Mapping]]] = ...) -> None: ...

class ComputeChunkedResponse(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ChunkedResponseHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[ChunkedResponseHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class AuditInput(_message.Message):
    __slots__ = ("path", "dtype", "shape", "sha256", "captured")
    PATH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CAPTURED_FIELD_NUMBER: _ClassVar[int]
    path: str
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    sha256: str
    captured: bool
    def __init__(self, path: _Optional[str] = ..., dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., sha256: _Optional[str] = ..., captured: _Optional[bool] = ...) -> None: ...

class AuditRecord(_message.Message):
    __slots__ = ("id", "request_id", "run_id", "step", "rank", "micro_batch", "tags", "time_unix_ns", "peer", "principal", "loss", "params_json", "call_json", "lossd_version", "torch_version", "device", "dtype", "inputs", "value_json", "value", "components", "grad_norms", "non_finite", "timings", "record_sha256", "session", "seq", "prev_sha256", "capture")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ComponentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class GradNormsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    CALL_JSON_FIELD_NUMBER: _ClassVar[int]
    LOSSD_VERSION_FIELD_NUMBER: _ClassVar[int]
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    VALUE_JSON_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORMS_FIELD_NUMBER: _ClassVar[int]
    NON_FINITE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    RECORD_SHA256_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PREV_SHA256_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_FIELD_NUMBER: _ClassVar[int]
    id: int
    request_id: str
    run_id: str
    step: int
    rank: int
    micro_batch: int
    tags: _containers.ScalarMap[str, str]
    time_unix_ns: int
    peer: str
    principal: str
    loss: str
    params_json: str
    call_json: str
    lossd_version: str
    torch_version: str
    device: str
    dtype: str
    inputs: _containers.RepeatedCompositeFieldContainer[AuditInput]
    value_json: str
    value: float
    components: _containers.ScalarMap[str, float]
    grad_norms: _containers.ScalarMap[str, float]
    non_finite: bool
    timings: Timings
    record_sha256: str
    session: str
    seq: int
    prev_sha256: str
    capture: str
    def __init__(self, id: _Optional[int] = ..., request_id: _Optional[str] = ..., run_id: _Optional[str] = ..., step: _Optional[int] = ..., rank: _Optional[int] = ..., micro_batch: _Optional[int] = ..., tags: _Optional[_Mapping[str, str]] = ..., time_unix_ns: _Optional[int] = ..., peer: _Optional[str] = ..., principal: _Optional[str] = ..., loss: _Optional[str] = ..., params_json: _Optional[str] = ..., call_json: _Optional[str] = ..., lossd_version: _Optional[str] = ..., torch_version: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[AuditInput, _Mapping]]] = ..., value_json: _Optional[str] = ..., value: _Optional[float] = ..., components: _Optional[_Mapping[str, float]] = ..., grad_norms: _Optional[_Mapping[str, float]] = ..., non_finite: _Optional[bool] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., record_sha256: _Optional[str] = ..., session: _Optional[str] = ..., seq: _Optional[int] = ..., prev_sha256: _Optional[str] = ..., capture: _Optional[str] = ...) -> None: ...

class AuditRunSummary(_message.Message):
    __slots__ = ("run_id", "records", "first_step", "last_step", "first_time_unix_ns", "last_time_unix_ns", "losses", "sessions")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_STEP_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    FIRST_TIME_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    LAST_TIME_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    records: int
    first_step: int
    last_step: int
    first_time_unix_ns: int
    last_time_unix_ns: int
    losses: _containers.RepeatedScalarFieldContainer[str]
    sessions: _containers.RepeatedCompositeFieldContainer[AuditSession]
    def __init__(self, run_id: _Optional[str] = ..., records: _Optional[int] = ..., first_step: _Optional[int] = ..., last_step: _Optional[int] = ..., first_time_unix_ns: _Optional[int] = ..., last_time_unix_ns: _Optional[int] = ..., losses: _Optional[_Iterable[str]] = ..., sessions: _Optional[_Iterable[_Union[AuditSession, _Mapping]]] = ...) -> None: ...

class AuditSession(_message.Message):
    __slots__ = ("session", "records", "first_step", "last_step", "first_time_unix_ns", "last_time_unix_ns")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_STEP_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    FIRST_TIME_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    LAST_TIME_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    session: str
    records: int
    first_step: int
    last_step: int
    first_time_unix_ns: int
    last_time_unix_ns: int
    def __init__(self, session: _Optional[str] = ..., records: _Optional[int] = ..., first_step: _Optional[int] = ..., last_step: _Optional[int] = ..., first_time_unix_ns: _Optional[int] = ..., last_time_unix_ns: _Optional[int] = ...) -> None: ...

class AuditCheckpoint(_message.Message):
    __slots__ = ("run_id", "records", "head_sha256", "time_unix_ns", "key_id", "signature")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    HEAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    records: int
    head_sha256: str
    time_unix_ns: int
    key_id: str
    signature: bytes
    def __init__(self, run_id: _Optional[str] = ..., records: _Optional[int] = ..., head_sha256: _Optional[str] = ..., time_unix_ns: _Optional[int] = ..., key_id: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class AuditSelector(_message.Message):
    __slots__ = ("run_id", "step_min", "step_max", "loss")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_MIN_FIELD_NUMBER: _ClassVar[int]
    STEP_MAX_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    step_min: int
    step_max: int
    loss: str
    def __init__(self, run_id: _Optional[str] = ..., step_min: _Optional[int] = ..., step_max: _Optional[int] = ..., loss: _Optional[str] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs",)
    RUNS_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[AuditRunSummary]
    def __init__(self, runs: _Optional[_Iterable[_Union[AuditRunSummary, _Mapping]]] = ...) -> None: ...

class GetRecordsRequest(_message.Message):
    __slots__ = ("selector",)
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    selector: AuditSelector
    def __init__(self, selector: _Optional[_Union[AuditSelector, _Mapping]] = ...) -> None: ...

class GetRecordsResponse(_message.Message):
    __slots__ = ("record", "total")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    record: AuditRecord
    total: int
    def __init__(self, record: _Optional[_Union[AuditRecord, _Mapping]] = ..., total: _Optional[int] = ...) -> None: ...

class VerifyRunRequest(_message.Message):
    __slots__ = ("selector", "tolerance", "checkpoint")
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    selector: AuditSelector
    tolerance: float
    checkpoint: AuditCheckpoint
    def __init__(self, selector: _Optional[_Union[AuditSelector, _Mapping]] = ..., tolerance: _Optional[float] = ..., checkpoint: _Optional[_Union[AuditCheckpoint, _Mapping]] = ...) -> None: ...

class VerifyResult(_message.Message):
    __slots__ = ("record_id", "request_id", "step", "loss", "status", "max_rel_dev_float64", "max_rel_dev_device", "tolerance", "message", "sampled", "seq", "session")
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MAX_REL_DEV_FLOAT64_FIELD_NUMBER: _ClassVar[int]
    MAX_REL_DEV_DEVICE_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    record_id: int
    request_id: str
    step: int
    loss: str
    status: VerifyStatus
    max_rel_dev_float64: float
    max_rel_dev_device: float
    tolerance: float
    message: str
    sampled: bool
    seq: int
    session: str
    def __init__(self, record_id: _Optional[int] = ..., request_id: _Optional[str] = ..., step: _Optional[int] = ..., loss: _Optional[str] = ..., status: _Optional[_Union[VerifyStatus, str]] = ..., max_rel_dev_float64: _Optional[float] = ..., max_rel_dev_device: _Optional[float] = ..., tolerance: _Optional[float] = ..., message: _Optional[str] = ..., sampled: _Optional[bool] = ..., seq: _Optional[int] = ..., session: _Optional[str] = ...) -> None: ...

class VerifyRunResponse(_message.Message):
    __slots__ = ("result", "done", "total", "chain")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    result: VerifyResult
    done: int
    total: int
    chain: AuditChainReport
    def __init__(self, result: _Optional[_Union[VerifyResult, _Mapping]] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., chain: _Optional[_Union[AuditChainReport, _Mapping]] = ...) -> None: ...

class AuditChainReport(_message.Message):
    __slots__ = ("records", "head_sha256", "broken_links", "problems", "signed_records", "checkpoint_extended", "unchained_records")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    HEAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    BROKEN_LINKS_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    SIGNED_RECORDS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EXTENDED_FIELD_NUMBER: _ClassVar[int]
    UNCHAINED_RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: int
    head_sha256: str
    broken_links: int
    problems: _containers.RepeatedScalarFieldContainer[str]
    signed_records: int
    checkpoint_extended: bool
    unchained_records: int
    def __init__(self, records: _Optional[int] = ..., head_sha256: _Optional[str] = ..., broken_links: _Optional[int] = ..., problems: _Optional[_Iterable[str]] = ..., signed_records: _Optional[int] = ..., checkpoint_extended: _Optional[bool] = ..., unchained_records: _Optional[int] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("checkpoint",)
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    checkpoint: AuditCheckpoint
    def __init__(self, checkpoint: _Optional[_Union[AuditCheckpoint, _Mapping]] = ...) -> None: ...

class GetPublicKeyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetPublicKeyResponse(_message.Message):
    __slots__ = ("key_id", "public_key", "public_key_pem")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    public_key: bytes
    public_key_pem: str
    def __init__(self, key_id: _Optional[str] = ..., public_key: _Optional[bytes] = ..., public_key_pem: _Optional[str] = ...) -> None: ...

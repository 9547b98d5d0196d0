from estuary.proto.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SecAggStage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SECAGG_STAGE_UNSPECIFIED: _ClassVar[SecAggStage]
    SECAGG_STAGE_ADVERTISE_KEYS: _ClassVar[SecAggStage]
    SECAGG_STAGE_SHARE_KEYS: _ClassVar[SecAggStage]
    SECAGG_STAGE_MASKED_INPUT: _ClassVar[SecAggStage]
    SECAGG_STAGE_CONSISTENCY_CHECK: _ClassVar[SecAggStage]
    SECAGG_STAGE_UNMASKING: _ClassVar[SecAggStage]
    SECAGG_STAGE_DONE: _ClassVar[SecAggStage]
    SECAGG_STAGE_ABORTED: _ClassVar[SecAggStage]
SECAGG_STAGE_UNSPECIFIED: SecAggStage
SECAGG_STAGE_ADVERTISE_KEYS: SecAggStage
SECAGG_STAGE_SHARE_KEYS: SecAggStage
SECAGG_STAGE_MASKED_INPUT: SecAggStage
SECAGG_STAGE_CONSISTENCY_CHECK: SecAggStage
SECAGG_STAGE_UNMASKING: SecAggStage
SECAGG_STAGE_DONE: SecAggStage
SECAGG_STAGE_ABORTED: SecAggStage

class EnrollRequest(_message.Message):
    __slots__ = ("token", "identity_public_key", "device_class", "client_version", "tls_csr", "tls_csr_proof")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    TLS_CSR_FIELD_NUMBER: _ClassVar[int]
    TLS_CSR_PROOF_FIELD_NUMBER: _ClassVar[int]
    token: str
    identity_public_key: bytes
    device_class: str
    client_version: str
    tls_csr: bytes
    tls_csr_proof: bytes
    def __init__(self, token: _Optional[str] = ..., identity_public_key: _Optional[bytes] = ..., device_class: _Optional[str] = ..., client_version: _Optional[str] = ..., tls_csr: _Optional[bytes] = ..., tls_csr_proof: _Optional[bytes] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("device_id", "device_class", "r_max", "client_certificate_pem")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    R_MAX_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    device_class: _common_pb2.DeviceClass
    r_max: int
    client_certificate_pem: bytes
    def __init__(self, device_id: _Optional[str] = ..., device_class: _Optional[_Union[_common_pb2.DeviceClass, _Mapping]] = ..., r_max: _Optional[int] = ..., client_certificate_pem: _Optional[bytes] = ...) -> None: ...

class RenewCertificateRequest(_message.Message):
    __slots__ = ("auth", "tls_csr")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    TLS_CSR_FIELD_NUMBER: _ClassVar[int]
    auth: _common_pb2.DeviceAuth
    tls_csr: bytes
    def __init__(self, auth: _Optional[_Union[_common_pb2.DeviceAuth, _Mapping]] = ..., tls_csr: _Optional[bytes] = ...) -> None: ...

class RenewCertificateResponse(_message.Message):
    __slots__ = ("client_certificate_pem",)
    CLIENT_CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    client_certificate_pem: bytes
    def __init__(self, client_certificate_pem: _Optional[bytes] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("auth", "held_version", "held_artifacts", "trained_task_id", "wait_ms")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    HELD_VERSION_FIELD_NUMBER: _ClassVar[int]
    HELD_ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    TRAINED_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    auth: _common_pb2.DeviceAuth
    held_version: int
    held_artifacts: _containers.RepeatedScalarFieldContainer[str]
    trained_task_id: str
    wait_ms: int
    def __init__(self, auth: _Optional[_Union[_common_pb2.DeviceAuth, _Mapping]] = ..., held_version: _Optional[int] = ..., held_artifacts: _Optional[_Iterable[str]] = ..., trained_task_id: _Optional[str] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class Pace(_message.Message):
    __slots__ = ("retry_after_ms", "reason")
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    retry_after_ms: int
    reason: str
    def __init__(self, retry_after_ms: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class SecAggParams(_message.Message):
    __slots__ = ("cohort", "cohort_size", "threshold", "bits", "frac_bits", "clip", "neighbours", "tensors", "active", "identity_keys")
    COHORT_FIELD_NUMBER: _ClassVar[int]
    COHORT_SIZE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    FRAC_BITS_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_KEYS_FIELD_NUMBER: _ClassVar[int]
    cohort: bytes
    cohort_size: int
    threshold: int
    bits: int
    frac_bits: int
    clip: float
    neighbours: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    active: bool
    identity_keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, cohort: _Optional[bytes] = ..., cohort_size: _Optional[int] = ..., threshold: _Optional[int] = ..., bits: _Optional[int] = ..., frac_bits: _Optional[int] = ..., clip: _Optional[float] = ..., neighbours: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., active: _Optional[bool] = ..., identity_keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "length")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    name: str
    length: int
    def __init__(self, name: _Optional[str] = ..., length: _Optional[int] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "cohort_id", "version", "artifact", "rank", "local_steps", "learning_rate", "grad_clip_norm", "batch_size", "seq_len", "deadline_ms", "member_index", "secagg", "columns", "warmup_steps", "trained_task_id")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    COHORT_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    GRAD_CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    MEMBER_INDEX_FIELD_NUMBER: _ClassVar[int]
    SECAGG_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    TRAINED_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    cohort_id: str
    version: int
    artifact: _common_pb2.BlobRef
    rank: int
    local_steps: int
    learning_rate: float
    grad_clip_norm: float
    batch_size: int
    seq_len: int
    deadline_ms: int
    member_index: int
    secagg: SecAggParams
    columns: _containers.RepeatedScalarFieldContainer[int]
    warmup_steps: int
    trained_task_id: str
    def __init__(self, task_id: _Optional[str] = ..., cohort_id: _Optional[str] = ..., version: _Optional[int] = ..., artifact: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., rank: _Optional[int] = ..., local_steps: _Optional[int] = ..., learning_rate: _Optional[float] = ..., grad_clip_norm: _Optional[float] = ..., batch_size: _Optional[int] = ..., seq_len: _Optional[int] = ..., deadline_ms: _Optional[int] = ..., member_index: _Optional[int] = ..., secagg: _Optional[_Union[SecAggParams, _Mapping]] = ..., columns: _Optional[_Iterable[int]] = ..., warmup_steps: _Optional[int] = ..., trained_task_id: _Optional[str] = ...) -> None: ...

class GetTaskResponse(_message.Message):
    __slots__ = ("task", "pace")
    TASK_FIELD_NUMBER: _ClassVar[int]
    PACE_FIELD_NUMBER: _ClassVar[int]
    task: Task
    pace: Pace
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ..., pace: _Optional[_Union[Pace, _Mapping]] = ...) -> None: ...

class FetchArtifactRequest(_message.Message):
    __slots__ = ("auth", "sha256", "offset", "chunk_bytes")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    auth: _common_pb2.DeviceAuth
    sha256: str
    offset: int
    chunk_bytes: int
    def __init__(self, auth: _Optional[_Union[_common_pb2.DeviceAuth, _Mapping]] = ..., sha256: _Optional[str] = ..., offset: _Optional[int] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class ArtifactChunk(_message.Message):
    __slots__ = ("offset", "data", "total_bytes")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_bytes: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class SecAggClientMessage(_message.Message):
    __slots__ = ("auth", "cohort_id", "stage", "payload")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    COHORT_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    auth: _common_pb2.DeviceAuth
    cohort_id: str
    stage: SecAggStage
    payload: bytes
    def __init__(self, auth: _Optional[_Union[_common_pb2.DeviceAuth, _Mapping]] = ..., cohort_id: _Optional[str] = ..., stage: _Optional[_Union[SecAggStage, str]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class SecAggAck(_message.Message):
    __slots__ = ("stage",)
    STAGE_FIELD_NUMBER: _ClassVar[int]
    stage: SecAggStage
    def __init__(self, stage: _Optional[_Union[SecAggStage, str]] = ...) -> None: ...

class AwaitSecAggRequest(_message.Message):
    __slots__ = ("auth", "cohort_id", "after_stage", "wait_ms")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    COHORT_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_STAGE_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    auth: _common_pb2.DeviceAuth
    cohort_id: str
    after_stage: SecAggStage
    wait_ms: int
    def __init__(self, auth: _Optional[_Union[_common_pb2.DeviceAuth, _Mapping]] = ..., cohort_id: _Optional[str] = ..., after_stage: _Optional[_Union[SecAggStage, str]] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class SecAggServerMessage(_message.Message):
    __slots__ = ("cohort_id", "stage", "payload", "weight", "pending", "abort_reason")
    COHORT_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    ABORT_REASON_FIELD_NUMBER: _ClassVar[int]
    cohort_id: str
    stage: SecAggStage
    payload: bytes
    weight: float
    pending: bool
    abort_reason: str
    def __init__(self, cohort_id: _Optional[str] = ..., stage: _Optional[_Union[SecAggStage, str]] = ..., payload: _Optional[bytes] = ..., weight: _Optional[float] = ..., pending: _Optional[bool] = ..., abort_reason: _Optional[str] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("auth", "task_id", "cohort_id", "total_bytes", "sha256")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    COHORT_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    auth: _common_pb2.DeviceAuth
    task_id: str
    cohort_id: str
    total_bytes: int
    sha256: str
    def __init__(self, auth: _Optional[_Union[_common_pb2.DeviceAuth, _Mapping]] = ..., task_id: _Optional[str] = ..., cohort_id: _Optional[str] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadAck(_message.Message):
    __slots__ = ("accepted", "duplicate", "durable_bytes")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    DURABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    duplicate: bool
    durable_bytes: int
    def __init__(self, accepted: _Optional[bool] = ..., duplicate: _Optional[bool] = ..., durable_bytes: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("auth", "task_id", "steps_done")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STEPS_DONE_FIELD_NUMBER: _ClassVar[int]
    auth: _common_pb2.DeviceAuth
    task_id: str
    steps_done: int
    def __init__(self, auth: _Optional[_Union[_common_pb2.DeviceAuth, _Mapping]] = ..., task_id: _Optional[str] = ..., steps_done: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("action", "current_version")
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ACTION_UNSPECIFIED: _ClassVar[HeartbeatResponse.Action]
        ACTION_CONTINUE: _ClassVar[HeartbeatResponse.Action]
        ACTION_ABANDON: _ClassVar[HeartbeatResponse.Action]
    ACTION_UNSPECIFIED: HeartbeatResponse.Action
    ACTION_CONTINUE: HeartbeatResponse.Action
    ACTION_ABANDON: HeartbeatResponse.Action
    ACTION_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    action: HeartbeatResponse.Action
    current_version: int
    def __init__(self, action: _Optional[_Union[HeartbeatResponse.Action, str]] = ..., current_version: _Optional[int] = ...) -> None: ...

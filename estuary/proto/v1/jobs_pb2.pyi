from estuary.proto.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EvaluateJob(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BuildArtifactsJob(_message.Message):
    __slots__ = ("device_class",)
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    device_class: str
    def __init__(self, device_class: _Optional[str] = ...) -> None: ...

class MergeJob(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExportOnnxJob(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GenerateJob(_message.Message):
    __slots__ = ("prompt", "max_new_tokens")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    max_new_tokens: int
    def __init__(self, prompt: _Optional[str] = ..., max_new_tokens: _Optional[int] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "version", "adapter", "created_ms", "evaluate", "build_artifacts", "merge", "generate", "export_onnx")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_FIELD_NUMBER: _ClassVar[int]
    BUILD_ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    MERGE_FIELD_NUMBER: _ClassVar[int]
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    EXPORT_ONNX_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    version: int
    adapter: _common_pb2.BlobRef
    created_ms: int
    evaluate: EvaluateJob
    build_artifacts: BuildArtifactsJob
    merge: MergeJob
    generate: GenerateJob
    export_onnx: ExportOnnxJob
    def __init__(self, job_id: _Optional[str] = ..., version: _Optional[int] = ..., adapter: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., created_ms: _Optional[int] = ..., evaluate: _Optional[_Union[EvaluateJob, _Mapping]] = ..., build_artifacts: _Optional[_Union[BuildArtifactsJob, _Mapping]] = ..., merge: _Optional[_Union[MergeJob, _Mapping]] = ..., generate: _Optional[_Union[GenerateJob, _Mapping]] = ..., export_onnx: _Optional[_Union[ExportOnnxJob, _Mapping]] = ...) -> None: ...

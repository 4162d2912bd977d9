from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Assignment(_message.Message):
    __slots__ = ("generation", "rank", "local_rank", "world_size", "local_world_size", "group_rank", "master_addr", "master_port", "restart_count", "job_id", "node_id")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    LOCAL_RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    GROUP_RANK_FIELD_NUMBER: _ClassVar[int]
    MASTER_ADDR_FIELD_NUMBER: _ClassVar[int]
    MASTER_PORT_FIELD_NUMBER: _ClassVar[int]
    RESTART_COUNT_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    generation: int
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    group_rank: int
    master_addr: str
    master_port: int
    restart_count: int
    job_id: str
    node_id: str
    def __init__(self, generation: _Optional[int] = ..., rank: _Optional[int] = ..., local_rank: _Optional[int] = ..., world_size: _Optional[int] = ..., local_world_size: _Optional[int] = ..., group_rank: _Optional[int] = ..., master_addr: _Optional[str] = ..., master_port: _Optional[int] = ..., restart_count: _Optional[int] = ..., job_id: _Optional[str] = ..., node_id: _Optional[str] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("local_rank", "pid", "import_s")
    LOCAL_RANK_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    IMPORT_S_FIELD_NUMBER: _ClassVar[int]
    local_rank: int
    pid: int
    import_s: float
    def __init__(self, local_rank: _Optional[int] = ..., pid: _Optional[int] = ..., import_s: _Optional[float] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("assignment", "committed_step")
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_STEP_FIELD_NUMBER: _ClassVar[int]
    assignment: Assignment
    committed_step: int
    def __init__(self, assignment: _Optional[_Union[Assignment, _Mapping]] = ..., committed_step: _Optional[int] = ...) -> None: ...

class SegmentRequest(_message.Message):
    __slots__ = ("local_rank", "nbytes")
    LOCAL_RANK_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    local_rank: int
    nbytes: int
    def __init__(self, local_rank: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class SegmentReply(_message.Message):
    __slots__ = ("segment",)
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    segment: str
    def __init__(self, segment: _Optional[str] = ...) -> None: ...

class SealedRequest(_message.Message):
    __slots__ = ("local_rank", "step", "generation", "nbytes", "stall_s")
    LOCAL_RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    STALL_S_FIELD_NUMBER: _ClassVar[int]
    local_rank: int
    step: int
    generation: int
    nbytes: int
    stall_s: float
    def __init__(self, local_rank: _Optional[int] = ..., step: _Optional[int] = ..., generation: _Optional[int] = ..., nbytes: _Optional[int] = ..., stall_s: _Optional[float] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WaitRequest(_message.Message):
    __slots__ = ("local_rank", "after", "timeout_s")
    LOCAL_RANK_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    local_rank: int
    after: int
    timeout_s: float
    def __init__(self, local_rank: _Optional[int] = ..., after: _Optional[int] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class WaitReply(_message.Message):
    __slots__ = ("status", "assignment", "detail")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OK: _ClassVar[WaitReply.Status]
        TIMEOUT: _ClassVar[WaitReply.Status]
        CLOSED: _ClassVar[WaitReply.Status]
        NOT_MEMBER: _ClassVar[WaitReply.Status]
    OK: WaitReply.Status
    TIMEOUT: WaitReply.Status
    CLOSED: WaitReply.Status
    NOT_MEMBER: WaitReply.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    status: WaitReply.Status
    assignment: Assignment
    detail: str
    def __init__(self, status: _Optional[_Union[WaitReply.Status, str]] = ..., assignment: _Optional[_Union[Assignment, _Mapping]] = ..., detail: _Optional[str] = ...) -> None: ...

class RestoreRequest(_message.Message):
    __slots__ = ("local_rank",)
    LOCAL_RANK_FIELD_NUMBER: _ClassVar[int]
    local_rank: int
    def __init__(self, local_rank: _Optional[int] = ...) -> None: ...

class RestoreReply(_message.Message):
    __slots__ = ("has_source", "step", "generation", "segment", "source_rank", "origin", "world_size", "error", "slices")
    HAS_SOURCE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_RANK_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    has_source: bool
    step: int
    generation: int
    segment: str
    source_rank: int
    origin: str
    world_size: int
    error: str
    slices: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, has_source: _Optional[bool] = ..., step: _Optional[int] = ..., generation: _Optional[int] = ..., segment: _Optional[str] = ..., source_rank: _Optional[int] = ..., origin: _Optional[str] = ..., world_size: _Optional[int] = ..., error: _Optional[str] = ..., slices: _Optional[_Iterable[str]] = ...) -> None: ...

class CommittedRequest(_message.Message):
    __slots__ = ("local_rank", "overwrite_segment")
    LOCAL_RANK_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    local_rank: int
    overwrite_segment: str
    def __init__(self, local_rank: _Optional[int] = ..., overwrite_segment: _Optional[str] = ...) -> None: ...

class CommittedReply(_message.Message):
    __slots__ = ("step", "skip", "reason")
    STEP_FIELD_NUMBER: _ClassVar[int]
    SKIP_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    step: int
    skip: bool
    reason: str
    def __init__(self, step: _Optional[int] = ..., skip: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

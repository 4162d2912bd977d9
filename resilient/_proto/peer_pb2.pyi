from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PeerAuth(_message.Message):
    __slots__ = ("job", "generation", "node_id", "issued_unix_ms", "mac")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ISSUED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    job: str
    generation: int
    node_id: str
    issued_unix_ms: int
    mac: bytes
    def __init__(self, job: _Optional[str] = ..., generation: _Optional[int] = ..., node_id: _Optional[str] = ..., issued_unix_ms: _Optional[int] = ..., mac: _Optional[bytes] = ...) -> None: ...

class ShardRef(_message.Message):
    __slots__ = ("rank", "step", "shard_generation", "nbytes", "world_size")
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SHARD_GENERATION_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    rank: int
    step: int
    shard_generation: int
    nbytes: int
    world_size: int
    def __init__(self, rank: _Optional[int] = ..., step: _Optional[int] = ..., shard_generation: _Optional[int] = ..., nbytes: _Optional[int] = ..., world_size: _Optional[int] = ...) -> None: ...

class OfferRequest(_message.Message):
    __slots__ = ("auth", "shard")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    auth: PeerAuth
    shard: ShardRef
    def __init__(self, auth: _Optional[_Union[PeerAuth, _Mapping]] = ..., shard: _Optional[_Union[ShardRef, _Mapping]] = ...) -> None: ...

class OfferReply(_message.Message):
    __slots__ = ("accepted", "reason")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("auth", "shard", "bulk_addr", "range_lo", "range_hi")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    BULK_ADDR_FIELD_NUMBER: _ClassVar[int]
    RANGE_LO_FIELD_NUMBER: _ClassVar[int]
    RANGE_HI_FIELD_NUMBER: _ClassVar[int]
    auth: PeerAuth
    shard: ShardRef
    bulk_addr: str
    range_lo: int
    range_hi: int
    def __init__(self, auth: _Optional[_Union[PeerAuth, _Mapping]] = ..., shard: _Optional[_Union[ShardRef, _Mapping]] = ..., bulk_addr: _Optional[str] = ..., range_lo: _Optional[int] = ..., range_hi: _Optional[int] = ...) -> None: ...

class PullReply(_message.Message):
    __slots__ = ("ok", "reason", "nbytes", "corrupt")
    OK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    reason: str
    nbytes: int
    corrupt: bool
    def __init__(self, ok: _Optional[bool] = ..., reason: _Optional[str] = ..., nbytes: _Optional[int] = ..., corrupt: _Optional[bool] = ...) -> None: ...

class DropRequest(_message.Message):
    __slots__ = ("auth", "ranks", "below_step")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    BELOW_STEP_FIELD_NUMBER: _ClassVar[int]
    auth: PeerAuth
    ranks: _containers.RepeatedScalarFieldContainer[int]
    below_step: int
    def __init__(self, auth: _Optional[_Union[PeerAuth, _Mapping]] = ..., ranks: _Optional[_Iterable[int]] = ..., below_step: _Optional[int] = ...) -> None: ...

class DropReply(_message.Message):
    __slots__ = ("dropped",)
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    dropped: int
    def __init__(self, dropped: _Optional[int] = ...) -> None: ...

class Holding(_message.Message):
    __slots__ = ("shard", "segment", "owner")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    shard: ShardRef
    segment: str
    owner: bool
    def __init__(self, shard: _Optional[_Union[ShardRef, _Mapping]] = ..., segment: _Optional[str] = ..., owner: _Optional[bool] = ...) -> None: ...

class ListHoldingsRequest(_message.Message):
    __slots__ = ("auth",)
    AUTH_FIELD_NUMBER: _ClassVar[int]
    auth: PeerAuth
    def __init__(self, auth: _Optional[_Union[PeerAuth, _Mapping]] = ...) -> None: ...

class ListHoldingsReply(_message.Message):
    __slots__ = ("holdings",)
    HOLDINGS_FIELD_NUMBER: _ClassVar[int]
    holdings: _containers.RepeatedCompositeFieldContainer[Holding]
    def __init__(self, holdings: _Optional[_Iterable[_Union[Holding, _Mapping]]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("auth",)
    AUTH_FIELD_NUMBER: _ClassVar[int]
    auth: PeerAuth
    def __init__(self, auth: _Optional[_Union[PeerAuth, _Mapping]] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("node_id", "generation", "committed_step", "host_memory_bytes", "sent_bytes", "received_bytes", "skipped")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_STEP_FIELD_NUMBER: _ClassVar[int]
    HOST_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    SENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    generation: int
    committed_step: int
    host_memory_bytes: int
    sent_bytes: int
    received_bytes: int
    skipped: int
    def __init__(self, node_id: _Optional[str] = ..., generation: _Optional[int] = ..., committed_step: _Optional[int] = ..., host_memory_bytes: _Optional[int] = ..., sent_bytes: _Optional[int] = ..., received_bytes: _Optional[int] = ..., skipped: _Optional[int] = ...) -> None: ...

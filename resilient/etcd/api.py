"""The key-value contract resilient needs from etcd v3, written down once.

Two implementations stand behind it: ``resilient.etcd.client.EtcdKV`` (a real etcd cluster through
``pyetcd``; the only module that imports the etcd client) and ``resilient.etcd.fake.FakeKV`` (an
in-memory twin of the same semantics, with an injected clock, for pure-logic and property-based tests).

Semantics follow etcd v3: every successful write bumps one global revision; each key carries
``create_revision``, ``mod_revision``, ``version`` and the lease it is bound to; a transaction evaluates
all its comparisons atomically against one revision and applies either the success or the failure
operations; a lease expires ``ttl`` seconds after its last keep-alive and deletes its keys; a watch
delivers every change under a prefix, in revision order, starting after ``start_revision`` if given.
Keys are ``str``; values are ``bytes``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence, Union


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


CompareTarget = Literal["version", "create", "mod", "value", "lease"]
CompareOp = Literal["==", "!=", "<", ">"]


@dataclass(frozen=True)
class Compare:
    """One transaction guard, e.g. ``Compare("gen", "mod", "==", 42)`` or ``Compare(k, "version", "==", 0)``
    (the key does not exist). With ``prefix`` it holds for every key under ``key`` (etcd's range compare:
    true when no key is there, except on ``value``), e.g. ``Compare(p, "mod", "<", rev + 1, prefix=True)``:
    nothing under ``p`` changed after revision ``rev``."""

    key: str
    target: CompareTarget
    op: CompareOp
    value: Union[int, bytes]
    prefix: bool = False


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str
    prefix: bool = False


@dataclass(frozen=True)
class Get:
    key: str
    prefix: bool = False


Op = Union[Put, Delete, Get]


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    # one entry per op of the branch that ran: for Get a list[KeyValue], for Put/Delete None
    responses: list = field(default_factory=list)


@dataclass(frozen=True)
class WatchEvent:
    type: Literal["put", "delete"]
    key: str
    value: bytes
    mod_revision: int
    prev_value: bytes | None = None


class WatchHandle(abc.ABC):
    @abc.abstractmethod
    def cancel(self) -> None:
        """Stop delivering events (idempotent)."""


class KVStore(abc.ABC):
    """What resilient needs of etcd. All methods raise ``resilient.errors.EtcdError`` subclasses."""

    @abc.abstractmethod
    def get(self, key: str) -> KeyValue | None: ...

    @abc.abstractmethod
    def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """All keys under ``prefix`` sorted by key, and the store revision they were read at."""

    @abc.abstractmethod
    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Write; returns the new revision."""

    @abc.abstractmethod
    def delete(self, key: str, prefix: bool = False) -> int:
        """Delete one key (or all keys under a prefix); returns how many were deleted."""

    @abc.abstractmethod
    def txn(self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult: ...

    @abc.abstractmethod
    def lease_grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` whole seconds; returns its id."""

    @abc.abstractmethod
    def lease_keepalive(self, lease_id: int) -> int:
        """Refresh the lease; returns the TTL granted. Raises LeaseExpiredError when the lease is gone."""

    @abc.abstractmethod
    def lease_revoke(self, lease_id: int) -> None:
        """Revoke the lease and delete its keys (a lease already gone is not an error)."""

    @abc.abstractmethod
    def lease_ttl(self, lease_id: int) -> int:
        """Seconds left on the lease, or -1 when it no longer exists."""

    @abc.abstractmethod
    def watch_prefix(
        self, prefix: str, callback: Callable[[WatchEvent], None], start_revision: int | None = None
    ) -> WatchHandle:
        """Deliver every change under ``prefix`` to ``callback`` (from a background thread), in revision
        order; a watch survives transient errors and endpoint failover without losing events."""

    @abc.abstractmethod
    def revision(self) -> int:
        """The store's current revision."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> "KVStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The one error hierarchy of resilient.

Every failure that crosses a module boundary is a ``ResilientError`` subclass, raised with ``from exc``
when it wraps a lower-level error. Messages are whole sentences that name the offending values and say
what to do about them.
"""

from __future__ import annotations


class ResilientError(Exception):
    """Root of every error resilient raises on purpose."""


class ConfigError(ResilientError, ValueError):
    """Settings that are invalid or inconsistent with each other (refused at start-up)."""


# --- control plane (etcd) ---------------------------------------------------------------------------
class EtcdError(ResilientError):
    """An etcd operation failed; the message names the endpoint(s)."""


class EtcdUnavailableError(EtcdError):
    """No etcd endpoint answered within the deadline."""


class EtcdAuthError(EtcdError):
    """etcd refused the credentials or the TLS handshake."""


class LeaseExpiredError(EtcdError):
    """This node's lease is gone: it was paused or partitioned past its TTL and must rejoin."""


class FencedError(ResilientError):
    """A write on behalf of a generation was refused because the job has moved on to a newer one."""


# --- rendezvous ----------------------------------------------------------------------------------------
class RendezvousError(ResilientError):
    """Rendezvous could not form a generation."""


class RendezvousTimeoutError(RendezvousError):
    """Fewer than the minimum number of nodes joined before the join timeout."""


class RendezvousClosedError(RendezvousError):
    """The job has finished or failed; no new generation will form."""


class RestartBudgetExceededError(RendezvousError):
    """The job-wide restart budget is used up."""


# --- workers / launcher ------------------------------------------------------------------------------
class WorkerError(ResilientError):
    """A worker process failed."""


class GenerationChangedError(ResilientError):
    """Raised inside a worker when the job moved to a new generation; the decorator recovers in-process."""


# --- snapshots, store, transport --------------------------------------------------------------------
class StoreError(ResilientError):
    """The shared-memory shard store failed."""


class StoreSpaceError(StoreError):
    """Not enough room in /dev/shm (or the segment) for a snapshot."""


class WriteStoppedError(StoreError):
    """A snapshot write was stopped part-way because a member of the writer's generation failed (see
    ``resilient.store.segment.StopWhen``): the slot it wrote is invalid and the earlier snapshots stay."""


class ChecksumError(StoreError):
    """Stored bytes do not match their checksum; the message names the tensor and chunk."""


class StateError(ResilientError):
    """Protected state cannot be captured or restored (wrong type, shape, size, non-contiguous...)."""


class TransportError(ResilientError):
    """Moving shard bytes between hosts failed (short read, bad token, peer gone, bad checksum)."""


class ReplicationError(ResilientError):
    """A shard could not be replicated or restored from any holder."""


class PersistError(ResilientError):
    """Writing or reading a durable checkpoint failed."""


class CheckpointCorruptError(PersistError):
    """A durable checkpoint is partial or fails verification."""


class ChaosError(ResilientError):
    """The chaos harness could not set up, inject or evaluate a scenario."""


class FailpointError(ResilientError):
    """A failpoint armed with ``raise`` fired (an injected failure, see ``resilient.failpoints``)."""


class EtcdIndeterminateError(EtcdUnavailableError):
    """A non-idempotent etcd write (a transaction) failed in a way that leaves its outcome unknown: it may or
    may not have been applied. Re-read the keys it guards and decide again (its compares make that safe)."""

"""``Withdrawn``: the sealed copies an agent no longer counts as held, because they are about to be
overwritten.

A segment has two slots. A new snapshot (a worker's write, or a transfer received from a peer) goes over
the newest *uncommitted* one, never over the committed step's copy. An agent counts its copy of step
``s`` when it commits ``s``; checking that the copy is there and publishing the commit are two moments,
and a write starting between them would overwrite the copy of the step just committed. So an overwrite
is announced first: under the lock its agent also holds from that check to publishing the commit, the
slot about to be overwritten is recorded here (and its claim in etcd withdrawn, where there is one). A
commit decided after that does not count the copy; a commit published before it is seen by the writer,
which then keeps that slot.

A record names the copy by its ``Segment.seal_id`` (seq and seal time), which changes at every seal: when
the slot is sealed again (the overwrite done, or a snapshot of the same step written anew) the record no
longer matches and the new copy counts. There are at most two records per segment (one per slot). The
callers' lock orders a withdrawal with their commits; the records themselves are also safe to touch from
any thread (a dropped segment is forgotten from whichever thread drops it).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the store imports torch; an agent with one node maps segments only once workers ask
    from resilient.store import Segment, SlotInfo


class Withdrawn:
    def __init__(self) -> None:
        self._ids: dict[tuple[str, int], tuple[int, int]] = {}  # (segment name, slot) -> seal_id of the copy
        self._lock = threading.Lock()

    def withdraw(self, segment: Segment, slot: int) -> SlotInfo | None:
        """Record that ``slot`` of ``segment`` is about to be overwritten; returns what it holds (None when
        it holds no sealed copy: nothing to withdraw)."""
        info = segment.slots()[slot]
        with self._lock:
            seal = segment.seal_id(slot) if info.sealed else None
            if seal is None:
                self._ids.pop((segment.name, slot), None)
                return None
            self._ids[(segment.name, slot)] = seal
        return info

    def restore(self, segment: Segment, slot: int) -> None:
        """The overwrite will not happen after all (the copy turned out committed, or the write was called
        off): the copy counts again."""
        with self._lock:
            self._ids.pop((segment.name, slot), None)

    def held(self, segment: Segment, step: int, generation: int) -> bool:
        """Whether ``segment`` holds a sealed copy of ``step`` (of ``generation``) that counts: one not
        withdrawn since its seal."""
        slot = segment.sealed_slot(step, generation)
        return slot is not None and not self.covers(segment, slot)

    def covers(self, segment: Segment, slot: int) -> bool:
        """Whether the copy now sealed in ``slot`` was withdrawn (False for an unsealed slot, or a copy
        sealed there since the withdrawal)."""
        seal = segment.seal_id(slot)
        with self._lock:
            return seal is not None and self._ids.get((segment.name, slot)) == seal

    def forget(self, name: str) -> None:
        """Drop the records of a segment that is gone (unlinked or replaced by a larger one)."""
        with self._lock:
            for key in [k for k in self._ids if k[0] == name]:
                del self._ids[key]


__all__ = ["Withdrawn"]

"""Sliced (data-parallel deduplicated) snapshots as the agent sees them: without torch, from the slot.

A worker running with ``dedup`` (``resilient.elastic.dedup``) seals only its slice of the state every
rank holds alike, plus the marker tensor ``_dedup`` (int64 ``[rank, world_size, lo, hi, total]``). The
agent reads the marker from the slot itself (index and 40 bytes of data) to learn that restoring any rank
of that step needs the shards of all ``world_size`` ranks of the step, not one.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MARKER = "_dedup"  # the marker tensor of a sliced snapshot
PREFIX = "_dedup/"  # slice tensors: _dedup/<key of the whole tensor>
_MARKER = struct.Struct("<5q")


def bounds(rank: int, world_size: int, total: int) -> tuple[int, int]:
    """Bytes ``[lo, hi)`` of the shared stream of ``total`` bytes that rank ``rank`` of ``world_size`` keeps."""
    return total * rank // world_size, total * (rank + 1) // world_size


@dataclass(frozen=True)
class Marker:
    rank: int
    world_size: int
    lo: int
    hi: int
    total: int


def marker_of(segment, slot: int) -> Marker | None:
    """The slice marker of a sealed slot, or None when the slot holds a whole (unsliced) snapshot."""
    spec = next((t for t in segment.slot_index(slot).tensors if t.name == MARKER), None)
    if spec is None or spec.nbytes != _MARKER.size:
        return None
    buf = segment.slot_buffer(slot)
    try:
        return Marker(*_MARKER.unpack_from(buf, spec.offset))
    finally:
        buf.release()


def marker_at(segment, step: int, generation: int) -> Marker | None:
    """``marker_of`` the sealed slot of (step, generation) in ``segment`` (None when none or unsliced)."""
    slot = segment.sealed_slot(step, generation)
    return None if slot is None else marker_of(segment, slot)


__all__ = ["MARKER", "PREFIX", "Marker", "bounds", "marker_at", "marker_of"]

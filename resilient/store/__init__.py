"""The shard store: snapshots of each rank's tensors in shared memory, moved at hardware speed.

``Segment`` (two slots, atomic flip on seal, per-chunk CRC32C), ``list_segments``/``reclaim_stale``
(ownership and cleanup), and in ``resilient.store.transport`` the bulk TCP path between hosts. The
engine is ``resilient._native`` when built, else the pure-Python twin (``_loader.backend()``).
"""

from resilient.store._loader import backend, is_native
from resilient.store.layout import SlotIndex, TensorSpec
from resilient.store.registry import SegmentInfo, list_segments, reclaim_stale, segment_path
from resilient.store.segment import PendingWrite, Segment, SlotInfo, Snapshot, StopWhen

__all__ = [
    "PendingWrite",
    "Segment",
    "SegmentInfo",
    "SlotIndex",
    "SlotInfo",
    "Snapshot",
    "StopWhen",
    "TensorSpec",
    "backend",
    "is_native",
    "list_segments",
    "reclaim_stale",
    "segment_path",
]

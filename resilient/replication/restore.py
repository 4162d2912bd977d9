"""Restore planning (pure): which rank's shard of the committed step a rank restores, and from where.

Rules:
* Only the committed step is ever restored (never a mix of steps).
* Same world size: rank ``r`` restores rank ``r``'s shard (per-rank state such as RNG and data position
  must come back bit for bit).
* Different world size: model and optimizer state are identical on every data-parallel rank, so any
  rank's shard serves; the plan prefers a shard already held on this node (no network), else
  ``rank % old_world_size``. ``source_rank`` tells the worker whose shard it got; per-rank state is
  re-derived by the decorator.
* Sources, cheapest first: this node's own copy; then the peers that hold a copy and are members of the
  current generation. Peers are rotated by rank so that the ranks restoring at once spread their pulls
  across all holders (striping at shard granularity), and a holder whose copy fails verification is
  skipped and reported by the executor, which moves on to the next one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Mapping

from resilient.replication.manifest import CommitRecord, ShardManifest


@dataclass(frozen=True)
class RestorePlan:
    rank: int
    step: int
    generation: int  # generation the snapshot was sealed in
    source_rank: int
    world_size: int  # world size the snapshot was taken with
    local: bool  # a copy is held by this node
    peers: tuple[str, ...]  # holders to pull from, in order of preference
    nbytes: int
    checksum: str


def source_rank_for(rank: int, world_size: int, committed: CommitRecord, held_here: Collection[int]) -> int:
    if world_size == committed.world_size:
        return rank
    local = sorted(r for r in held_here if 0 <= r < committed.world_size)
    if local:
        return local[rank % len(local)]
    return rank % committed.world_size


def plan(
    rank: int,
    world_size: int,
    node_id: str,
    committed: CommitRecord,
    manifests: Mapping[int, ShardManifest],
    held_here: Collection[int],
    members: Collection[str],
) -> RestorePlan | None:
    """The restore plan of ``rank`` in a world of ``world_size``, or None when no manifest of the
    committed step names the chosen shard (the caller falls back to the durable tier)."""
    source = source_rank_for(rank, world_size, committed, held_here)
    manifest = manifests.get(source)
    if manifest is None:
        return None
    holders = [h for h in manifest.holders if h != node_id and h in members]
    if holders:
        k = rank % len(holders)
        holders = holders[k:] + holders[:k]
    return RestorePlan(
        rank=rank,
        step=committed.step,
        generation=committed.generation,
        source_rank=source,
        world_size=committed.world_size,
        local=source in held_here,
        peers=tuple(holders),
        nbytes=manifest.nbytes,
        checksum=manifest.checksum,
    )

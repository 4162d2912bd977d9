"""Restore planning (pure): which rank's shard of the committed step a rank restores, and from where.

Rules:
* Only the committed step is ever restored (never a mix of steps).
* Same world size: rank ``r`` restores rank ``r``'s shard (per-rank state such as RNG and data position
  must come back bit for bit).
* Different world size: model and optimizer state are identical on every data-parallel rank, so any
  rank's shard serves; the plan prefers a shard already held on this node (no network): rank
  ``rank % old_world_size``'s when held here (a surviving host takes over a lost rank from the replica it
  holds), else any held here, else ``rank % old_world_size`` from a peer. ``source_rank`` tells the worker whose shard it got; per-rank state is
  re-derived by the decorator.
* Sources, cheapest first: this node's own copy; then the peers that hold a copy and are members of the
  current generation. Peers are rotated by rank so that the ranks restoring at once spread their pulls
  across all holders (striping at shard granularity); a shard with several holders is moreover pulled
  from all of them at once in disjoint byte ranges (``stripes``), and a holder whose copy fails verification is
  skipped and reported by the executor, which moves on to the next one. After a world-size change a
  rank whose chosen shard has no verified copy tries the other ranks' shards (``source_order``).
* Sliced snapshots (data-parallel deduplication, ``resilient.elastic.dedup``): each rank's shard holds
  only its 1/N slice of the shared state, so a restore needs the shard of every rank of the committed
  step, whatever the new world size: the executor fetches the chosen shard as above, sees the slice
  marker in it (``resilient.replication.slices``) and then fetches each other rank's shard the same way
  (``plan(..., source=r)``); ``unrecoverable(..., need_all=True)`` when a copy held here shows the step
  is sliced.
* ``unrecoverable`` names the shards of the committed step that no member holds any more; it depends only
  on etcd and the membership, so every agent reaches the same verdict and all ranks go to the durable
  tier together (never a mix of a memory step and a disk step).
* A copy found corrupt (or missing) only at fetch time is known to one agent alone. When no member can
  supply a verified copy of a shard, that agent strikes the members off the shard's manifest in etcd
  (``struck_off``; fenced) and publishes a fault for the generation: the next generation's plans, made
  from etcd again, all name the durable tier, so an agent that already planned the memory step re-plans
  with everyone else (``listed_here`` keeps a struck-off local copy from counting).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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
    owner: str = ""  # node whose segment the shard was sealed in


def source_rank_for(rank: int, world_size: int, committed: CommitRecord, held_here: Collection[int]) -> int:
    if world_size == committed.world_size:
        return rank
    if rank % committed.world_size in held_here:
        return rank % committed.world_size  # the same rank's shard, from a copy already here
    local = sorted(r for r in held_here if 0 <= r < committed.world_size)
    if local:
        return local[rank % len(local)]
    return rank % committed.world_size


def source_order(rank: int, world_size: int, committed: CommitRecord, held_here: Collection[int],
                 available: Collection[int]) -> list[int]:
    """Shards ``rank`` may restore, best first: only its own one when the world size is unchanged; else
    the preferred one (``source_rank_for``), then the others held here, then the rest."""
    first = source_rank_for(rank, world_size, committed, held_here)
    if world_size == committed.world_size:
        return [first]
    n = committed.world_size
    rest = sorted(r for r in held_here if 0 <= r < n) + [(rank + k) % n for k in range(n)]
    out = [first]
    for r in rest:
        if r not in out and r in available:
            out.append(r)
    return out


def unrecoverable(committed: CommitRecord, manifests: Mapping[int, ShardManifest], held_here: Collection[int],
                  members: Collection[str], world_size: int, need_all: bool = False) -> list[int]:
    """Ranks of the committed step whose shard has no copy left (not here, no holder among ``members``)
    when the restore needs them: all shards for an unchanged world size or a sliced (deduplicated)
    snapshot (``need_all``), any one shard otherwise."""
    def alive(r: int) -> bool:
        m = manifests.get(r)
        return r in held_here or (m is not None and any(h in members for h in m.holders))

    gone = [r for r in range(committed.world_size) if not alive(r)]
    if need_all or world_size == committed.world_size or len(gone) == committed.world_size:
        return gone
    return []


def plan(
    rank: int,
    world_size: int,
    node_id: str,
    committed: CommitRecord,
    manifests: Mapping[int, ShardManifest],
    held_here: Collection[int],
    members: Collection[str],
    source: int | None = None,
) -> RestorePlan | None:
    """The restore plan of ``rank`` in a world of ``world_size`` (from shard ``source``, by default the
    one ``source_rank_for`` picks), or None when no manifest of the committed step names that shard."""
    if source is None:
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
        owner=manifest.owner,
    )


def stripes(nbytes: int, holders: int) -> list[tuple[int, int]]:
    """Disjoint byte ranges covering ``[0, nbytes)``, one per holder (a shard pulled from all its holders
    at once), split on 64 KiB boundaries; fewer when the shard is too small to give each holder one."""
    unit = 64 << 10
    units = max(1, -(-nbytes // unit))
    k = max(1, min(holders, units))
    cuts = [min(nbytes, (units * i // k) * unit) for i in range(k)] + [nbytes]
    return [(cuts[i], cuts[i + 1]) for i in range(k) if cuts[i] < cuts[i + 1]]


def listed_here(held_here: Collection[int], manifests: Mapping[int, ShardManifest], node_id: str) -> set[int]:
    """The shards held here that etcd still lists this node as a holder of: a copy struck off the manifest
    (found corrupt, see ``struck_off``) no longer counts, so the verdict of ``unrecoverable`` rests on etcd
    and the membership alone."""
    return {r for r in held_here if r in manifests and node_id in manifests[r].holders}


def struck_off(manifest: ShardManifest, members: Collection[str]) -> ShardManifest:
    """``manifest`` without the holders among ``members``: written back when no member could supply a
    verified copy of the committed step, so that every agent's ``unrecoverable`` names this shard and all
    ranks go to the durable tier together."""
    return replace(manifest, holders=tuple(h for h in manifest.holders if h not in members))

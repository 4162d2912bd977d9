"""The records replication keeps in etcd: a shard manifest per (generation, step, rank) and the commit
record, encoded as JSON, validated on decode, plus parsing of manifest keys.

``ckpt/<g>/<step>/<rank>`` (``ShardManifest``): the shard's size and checksum and the nodes that hold a
verified copy (the owner first). Only the owner's agent writes it, each write fenced by generation.
``committed`` (``CommitRecord``): the newest step whose every shard has its copies.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace

from resilient.errors import ReplicationError
from resilient.keys import JobKeys


@dataclass(frozen=True)
class ShardManifest:
    rank: int
    step: int
    generation: int
    world_size: int
    nbytes: int
    checksum: str  # the slot's checksum digest, as the store reports it
    owner: str  # node whose segment the shard was sealed in
    holders: tuple[str, ...] = ()  # nodes with a verified copy (owner first)
    sealed_at: float = field(default_factory=time.time)
    sliced: bool = False  # a slice of a deduplicated step (resilient.elastic.dedup): a restore needs all slices

    def with_holder(self, node_id: str) -> "ShardManifest":
        if node_id in self.holders:
            return self
        return replace(self, holders=self.holders + (node_id,))

    def encode(self) -> bytes:
        d = asdict(self)
        d["holders"] = list(self.holders)
        return json.dumps(d, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "ShardManifest":
        try:
            d = json.loads(raw)
            return cls(
                rank=int(d["rank"]),
                step=int(d["step"]),
                generation=int(d["generation"]),
                world_size=int(d["world_size"]),
                nbytes=int(d["nbytes"]),
                checksum=str(d["checksum"]),
                owner=str(d["owner"]),
                holders=tuple(str(h) for h in d["holders"]),
                sealed_at=float(d.get("sealed_at", 0.0)),
                sliced=bool(d.get("sliced", False)),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ReplicationError(f"Shard manifest {raw[:200]!r} is not valid JSON of a ShardManifest.") from exc


@dataclass(frozen=True)
class CommitRecord:
    step: int
    generation: int
    world_size: int
    replicas: int
    committed_at: float = field(default_factory=time.time)

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "CommitRecord":
        try:
            d = json.loads(raw)
            return cls(
                step=int(d["step"]),
                generation=int(d["generation"]),
                world_size=int(d["world_size"]),
                replicas=int(d.get("replicas", 1)),
                committed_at=float(d.get("committed_at", 0.0)),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ReplicationError(f"Commit record {raw[:200]!r} is not valid JSON of a CommitRecord.") from exc


def parse_ckpt_key(keys: JobKeys, key: str) -> tuple[int, int, int] | None:
    """``(generation, step, rank)`` of a manifest key, or None for any other key."""
    if not key.startswith(keys.ckpt_prefix):
        return None
    parts = key[len(keys.ckpt_prefix):].split("/")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1]), int(parts[2])

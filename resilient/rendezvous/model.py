"""The rendezvous data model: who a node is, and the frozen assignment of one generation.

These are the only rendezvous types the node agent sees. Each has a compact JSON form (the assignment of
a 1,024-node generation is read by every node, so its encoding is kept small: lists, not objects, and
contiguous rank blocks as ``[start, count]``).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from resilient.errors import ConfigError, RendezvousError


def _check_hostport(what: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{what} {value!r} is not host:port (e.g. 10.0.0.5:29400).")


@dataclass(frozen=True)
class NodeInfo:
    """One node agent as it announces itself to the job."""

    node_id: str
    host: str
    addr: str  # the agent's peer gRPC endpoint, "host:port"
    bulk_addr: str  # the bulk shard receiver, "host:port"
    slots: int  # workers on this node
    store_port: int  # where this agent hosts the process-group TCPStore if it becomes group rank 0

    def __post_init__(self) -> None:
        if not self.node_id or "/" in self.node_id:
            raise ConfigError(f"node id {self.node_id!r} must be non-empty and contain no '/'.")
        if not self.host:
            raise ConfigError(f"node {self.node_id}: host name must not be empty.")
        _check_hostport(f"node {self.node_id}: agent address", self.addr)
        _check_hostport(f"node {self.node_id}: bulk address", self.bulk_addr)
        if self.slots < 1:
            raise ConfigError(f"node {self.node_id}: slots={self.slots} must be >= 1 (workers on this node).")
        if not 0 <= self.store_port < 65536:
            raise ConfigError(f"node {self.node_id}: store_port={self.store_port} is not a TCP port.")

    def to_json(self) -> bytes:
        return json.dumps(
            [self.node_id, self.host, self.addr, self.bulk_addr, self.slots, self.store_port], separators=(",", ":")
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "NodeInfo":
        try:
            node_id, host, addr, bulk_addr, slots, store_port = json.loads(raw)
            return cls(node_id, host, addr, bulk_addr, int(slots), int(store_port))
        except (ValueError, TypeError) as exc:
            raise RendezvousError(f"Malformed node record {raw[:200]!r} in etcd: {exc}.") from exc


@dataclass(frozen=True)
class NodeEntry:
    """One node's place in a generation."""

    node_id: str
    host: str
    addr: str
    bulk_addr: str
    group_rank: int
    ranks: tuple[int, ...]


def _encode_ranks(ranks: tuple[int, ...]) -> Any:
    if ranks and list(ranks) == list(range(ranks[0], ranks[0] + len(ranks))):
        return [ranks[0], len(ranks)]
    return {"r": list(ranks)}


def _decode_ranks(raw: Any) -> tuple[int, ...]:
    if isinstance(raw, dict):
        return tuple(int(r) for r in raw["r"])
    start, count = raw
    return tuple(range(int(start), int(start) + int(count)))


@dataclass(frozen=True)
class Assignment:
    """The frozen assignment of one generation: written once, never changed."""

    generation: int
    world_size: int
    nodes: tuple[NodeEntry, ...]  # ordered by group rank
    master_addr: str
    master_port: int
    created_at: float  # wall-clock time the generation closed

    @functools.cached_property
    def _by_id(self) -> dict[str, NodeEntry]:
        return {e.node_id: e for e in self.nodes}

    def entry(self, node_id: str) -> NodeEntry | None:
        return self._by_id.get(node_id)

    def ranks_of(self, node_id: str) -> tuple[int, ...]:
        e = self.entry(node_id)
        return e.ranks if e is not None else ()

    @functools.cached_property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(e.node_id for e in self.nodes)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "g": self.generation,
                "w": self.world_size,
                "m": [self.master_addr, self.master_port],
                "t": self.created_at,
                "n": [[e.node_id, e.host, e.addr, e.bulk_addr, e.group_rank, _encode_ranks(e.ranks)] for e in self.nodes],
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "Assignment":
        """Decode a generation record. Every node reads the same record, and an assignment is immutable, so
        the last few decodings are shared (several agents in one process decode a large one once)."""
        return _decode_assignment(bytes(raw))

    @classmethod
    def _decode(cls, raw: bytes) -> "Assignment":
        try:
            d = json.loads(raw)
            nodes = tuple(
                NodeEntry(n[0], n[1], n[2], n[3], int(n[4]), _decode_ranks(n[5])) for n in d["n"]
            )
            return cls(int(d["g"]), int(d["w"]), nodes, str(d["m"][0]), int(d["m"][1]), float(d["t"]))
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise RendezvousError(f"Malformed generation record {raw[:200]!r} in etcd: {exc}.") from exc


@functools.lru_cache(maxsize=8)
def _decode_assignment(raw: bytes) -> Assignment:
    return Assignment._decode(raw)

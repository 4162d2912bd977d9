"""Where the copies of each shard live: a pure, deterministic function of one generation's membership.

Each rank's shard has ``R`` copies on ``R`` distinct hosts: the owner's copy (the node that runs the rank
keeps it in its own segment) plus ``R - 1`` peers on other hosts. Peers are chosen by rendezvous
(highest-random-weight) hashing of ``(rank, host)``, so every agent computes the same answer from the
same membership without talking to the others, the load spreads evenly, and a membership change moves
only the copies that must move. Within a host that runs several agents, the node is chosen the same way.

``R`` is capped at the number of hosts (a warning says so): a single host holds one copy, and losing any
``R - 1`` hosts always leaves one full copy of every shard, since no two copies share a host.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from resilient.errors import ConfigError


@dataclass(frozen=True)
class Member:
    """One node of a generation, as placement sees it."""

    node_id: str
    host: str
    ranks: tuple[int, ...]


def members_of(assignment: object) -> list[Member]:
    """The members of a rendezvous ``Assignment`` (anything with ``.nodes`` of node_id/host/ranks)."""
    return [Member(str(n.node_id), str(n.host), tuple(int(r) for r in n.ranks)) for n in assignment.nodes]  # type: ignore[attr-defined]


def _score(rank: int, name: str) -> int:
    digest = hashlib.blake2b(f"{rank}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


@dataclass(frozen=True)
class Placement:
    """Holders of every rank's shard in one generation; ``holders[rank][0]`` is the owner node."""

    replicas: int  # the number asked for
    effective: int  # copies actually placed (capped at the number of hosts)
    holders: Mapping[int, tuple[str, ...]]
    host_of: Mapping[str, str]
    warning: str | None = None

    def peers(self, rank: int) -> tuple[str, ...]:
        """The nodes (other than the owner) that must hold a copy of ``rank``'s shard."""
        return self.holders[rank][1:]

    def owner(self, rank: int) -> str:
        return self.holders[rank][0]

    def ranks_held_by(self, node_id: str) -> list[int]:
        """Ranks whose shard ``node_id`` holds as a peer (not as owner)."""
        return sorted(r for r, h in self.holders.items() if node_id in h[1:])


def compute(members: Sequence[Member], replicas: int) -> Placement:
    """Placement of every rank's shard over ``members`` with ``replicas`` copies on distinct hosts."""
    if replicas < 1:
        raise ConfigError(f"replicas={replicas} must be >= 1.")
    host_of: dict[str, str] = {}
    nodes_on: dict[str, list[str]] = {}
    owner_of: dict[int, str] = {}
    for m in members:
        if m.node_id in host_of:
            raise ConfigError(f"Node {m.node_id!r} appears twice in the membership; node ids must be unique.")
        host_of[m.node_id] = m.host
        nodes_on.setdefault(m.host, []).append(m.node_id)
        for r in m.ranks:
            if r in owner_of:
                raise ConfigError(f"Rank {r} is assigned to both {owner_of[r]!r} and {m.node_id!r}.")
            owner_of[r] = m.node_id
    n_hosts = len(nodes_on)
    effective = min(replicas, n_hosts) if n_hosts else 0
    warning = None
    if n_hosts and replicas > n_hosts:
        warning = (
            f"--replicas {replicas} asks for more copies than there are hosts ({n_hosts}); placing {effective} "
            f"cop{'y' if effective == 1 else 'ies'} per shard (one per host)"
            + ("; a lost host loses its snapshots" if effective == 1 else "")
            + "."
        )
    holders: dict[int, tuple[str, ...]] = {}
    for rank, owner in sorted(owner_of.items()):
        own_host = host_of[owner]
        others = sorted((h for h in nodes_on if h != own_host), key=lambda h: (-_score(rank, h), h))
        chosen = [owner]
        for host in others[: effective - 1]:
            chosen.append(max(sorted(nodes_on[host]), key=lambda n: _score(rank, n)))
        holders[rank] = tuple(chosen)
    return Placement(replicas=replicas, effective=effective, holders=holders, host_of=host_of, warning=warning)


def for_assignment(assignment: object, replicas: int) -> Placement:
    return compute(members_of(assignment), replicas)


def surviving_copies(placement: Placement, lost_hosts: Iterable[str]) -> dict[int, int]:
    """How many copies of each rank's shard remain when ``lost_hosts`` are gone (for tests and reports)."""
    lost = set(lost_hosts)
    return {r: sum(1 for n in h if placement.host_of[n] not in lost) for r, h in placement.holders.items()}

"""Pure rendezvous decisions: state and time in, decision out. No I/O, no sleeping, no clock reads.

Three decisions live here, each testable with plain values:

* ``plan_assignment`` -- who is in generation g+1 and with which ranks (stable across generations);
* ``ClosingRound`` -- the closing node's view of a round (who waits, who is alive, since when) and its
  decision: keep waiting until some time, or close now with these nodes;
* ``member_trigger`` -- whether one watch event makes the current generation invalid, and why.

The executor (``executor.py``) feeds them what it reads from etcd and carries out what they decide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Union

from resilient.etcd.api import WatchEvent
from resilient.keys import JobKeys
from resilient.rendezvous.model import Assignment, NodeEntry, NodeInfo


# --- who is in the next generation, with which ranks -------------------------------------------------
def plan_assignment(
    generation: int,
    candidates: Mapping[str, NodeInfo],
    previous: Assignment | None,
    max_nodes: int,
    created_at: float,
) -> Assignment:
    """The assignment of ``generation`` for ``candidates`` (at least one).

    Members of ``previous`` come first (in their old group-rank order), then newcomers by node id; at most
    ``max_nodes`` are taken. A surviving node keeps its group rank and its ranks when they still fit
    (group rank < node count, every rank < world size, same number of slots); everyone else fills the
    lowest free ranks, in that same order. Ranks end up exactly 0..W-1 with W the sum of slots.
    """
    if not candidates:
        raise ValueError("plan_assignment needs at least one candidate node")
    prev = {e.node_id: e for e in previous.nodes} if previous is not None else {}
    survivors = sorted((n for n in candidates if n in prev), key=lambda n: prev[n].group_rank)
    newcomers = sorted(n for n in candidates if n not in prev)
    chosen = (survivors + newcomers)[:max_nodes]
    world = sum(candidates[n].slots for n in chosen)
    count = len(chosen)

    group_of: dict[str, int] = {}
    used_groups: set[int] = set()
    ranks_of: dict[str, tuple[int, ...]] = {}
    used_ranks: set[int] = set()
    for n in chosen:
        old = prev.get(n)
        if old is None:
            continue
        if old.group_rank < count and old.group_rank not in used_groups:
            group_of[n] = old.group_rank
            used_groups.add(old.group_rank)
        if (
            len(old.ranks) == candidates[n].slots
            and all(r < world for r in old.ranks)
            and not used_ranks.intersection(old.ranks)
        ):
            ranks_of[n] = old.ranks
            used_ranks.update(old.ranks)
    free_groups = iter(g for g in range(count) if g not in used_groups)
    free_ranks = iter(r for r in range(world) if r not in used_ranks)
    for n in chosen:
        if n not in group_of:
            group_of[n] = next(free_groups)
        if n not in ranks_of:
            ranks_of[n] = tuple(sorted(next(free_ranks) for _ in range(candidates[n].slots)))

    entries = tuple(
        sorted(
            (
                NodeEntry(n, candidates[n].host, candidates[n].addr, candidates[n].bulk_addr, group_of[n], ranks_of[n])
                for n in chosen
            ),
            key=lambda e: e.group_rank,
        )
    )
    master = candidates[entries[0].node_id]
    return Assignment(generation, world, entries, master.host, master.store_port, created_at)


# --- the closing node's round ------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeUp:
    node_id: str


@dataclass(frozen=True)
class NodeDown:
    node_id: str


@dataclass(frozen=True)
class Waiting:
    info: NodeInfo
    mod_revision: int


@dataclass(frozen=True)
class WaitingGone:
    node_id: str


RoundEvent = Union[NodeUp, NodeDown, Waiting, WaitingGone]


@dataclass(frozen=True)
class Wait:
    """Nothing to do before ``until`` (None: until something changes)."""

    until: float | None
    waiting: int


@dataclass(frozen=True)
class Close:
    """Close the round now with these nodes (their waiting-key revisions, for the close guard)."""

    reason: str  # "max" | "all-members-back" | "last-call"
    candidates: Mapping[str, NodeInfo]
    revisions: Mapping[str, int]


Decision = Union[Wait, Close]


@dataclass
class ClosingRound:
    """What the closing node knows of the round that will form generation ``previous_gen + 1``.

    A node counts as waiting when its ``waiting/<node>`` key was written after the previous generation
    formed (``formed_rev``); older keys belong to nodes already placed (or passed over) by that round.
    """

    min_nodes: int
    max_nodes: int
    last_call: float
    rejoin_grace: float  # how long live members of the previous generation get to come back
    previous: Assignment | None
    formed_rev: int
    alive: set[str] = field(default_factory=set)
    waiting: dict[str, Waiting] = field(default_factory=dict)
    opened_at: float | None = None  # first time anyone was waiting
    min_reached_at: float | None = None  # first time min_nodes were waiting (reset if it drops below)

    @classmethod
    def start(
        cls,
        now: float,
        *,
        min_nodes: int,
        max_nodes: int,
        last_call: float,
        rejoin_grace: float,
        previous: Assignment | None,
        formed_rev: int,
        alive: Iterable[str],
        waiting: Iterable[Waiting],
    ) -> "ClosingRound":
        r = cls(min_nodes, max_nodes, last_call, rejoin_grace, previous, formed_rev, set(alive))
        for w in waiting:
            r.apply(now, w)
        r.apply(now, None)
        return r

    def apply(self, now: float, event: RoundEvent | None) -> None:
        if isinstance(event, NodeUp):
            self.alive.add(event.node_id)
        elif isinstance(event, NodeDown):
            self.alive.discard(event.node_id)
            self.waiting.pop(event.node_id, None)
        elif isinstance(event, Waiting):
            if event.mod_revision > self.formed_rev:
                self.waiting[event.info.node_id] = event
        elif isinstance(event, WaitingGone):
            self.waiting.pop(event.node_id, None)
        if self.waiting and self.opened_at is None:
            self.opened_at = now
        if len(self.waiting) >= self.min_nodes:
            if self.min_reached_at is None:
                self.min_reached_at = now
        else:
            self.min_reached_at = None

    def missing_members(self) -> list[str]:
        """Live members of the previous generation that have not asked back in yet."""
        if self.previous is None:
            return []
        return [e.node_id for e in self.previous.nodes if e.node_id in self.alive and e.node_id not in self.waiting]

    def decide(self, now: float) -> Decision:
        n = len(self.waiting)
        if n >= self.max_nodes:
            return self._close("max")
        if self.min_reached_at is None:
            return Wait(None, n)
        members_alive = self.previous is not None and any(e.node_id in self.alive for e in self.previous.nodes)
        missing = self.missing_members()
        if members_alive and not missing:
            return self._close("all-members-back")
        deadline = self.min_reached_at + self.last_call
        if missing and self.opened_at is not None:
            deadline = max(deadline, self.opened_at + self.rejoin_grace)
        if now >= deadline:
            return self._close("last-call")
        return Wait(deadline, n)

    def _close(self, reason: str) -> Close:
        return Close(
            reason,
            {k: w.info for k, w in self.waiting.items()},
            {k: w.mod_revision for k, w in self.waiting.items()},
        )


# --- a member watching its generation ----------------------------------------------------------------
def _node_under(key: str, prefix: str) -> str | None:
    if key.startswith(prefix):
        rest = key[len(prefix):]
        return rest or None
    return None


# the prefixes of member_trigger's reasons that mean a member of the generation failed or is gone: no
# snapshot of that generation can commit any more (the agent tells its workers' snapshot copies to stop)
MEMBER_FAILED = ("fault:", "node-lost:")


def member_failed(reason: str) -> bool:
    """Whether a round's ``reason`` means a member of the ending generation failed or is gone."""
    return reason.startswith(MEMBER_FAILED)


def member_trigger(keys: JobKeys, assignment: Assignment, max_nodes: int, event: WatchEvent) -> str | None:
    """Why ``event`` (seen after ``assignment`` formed) ends that generation, or None if it does not.

    ``node-lost:<n>`` a member's node key vanished (lease lost or left); ``fault:<n>`` a fault was
    published for this generation; ``join:<n>`` a node asks into a new generation (a newcomer while the
    job is below MAX, or a member starting over); ``superseded:<g>`` a newer generation exists;
    ``closed`` the job was closed.
    """
    node = _node_under(event.key, keys.nodes_prefix)
    if node is not None:
        return f"node-lost:{node}" if event.type == "delete" and assignment.entry(node) is not None else None
    node = _node_under(event.key, keys.waiting_prefix)
    if node is not None:
        if event.type != "put":
            return None
        if assignment.entry(node) is not None or len(assignment.nodes) < max_nodes:
            return f"join:{node}"
        return None
    rest = _node_under(event.key, keys.fault_prefix)
    if rest is not None:
        gen_part, _, node = rest.partition("/")
        if event.type == "put" and gen_part.isdigit() and int(gen_part) == assignment.generation and node:
            return f"fault:{node}"
        return None
    rest = _node_under(event.key, keys.gen_prefix)
    if rest is not None:
        if event.type == "put" and rest.isdigit() and int(rest) > assignment.generation:
            return f"superseded:{int(rest)}"
        return None
    if event.key == keys.closed and event.type == "put":
        return "closed"
    return None

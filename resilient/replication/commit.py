"""When a step is committed: a pure decision, and the thin fenced executor that applies it in etcd.

``decide`` says whether step ``s`` of generation ``g`` can be committed: every rank ``0..world_size-1``
has a manifest of ``s`` listing at least ``required`` holders, and the commit record does not already
hold ``s`` or a newer step (committed steps only move forward). ``prunable`` says which manifests are
garbage once a step is committed: older steps, and uncommitted steps of older generations (fenced off,
they can never commit).

``CommitExecutor.try_commit`` reads the manifests and the commit record, decides, and writes the record
with a transaction fenced by generation (``rendezvous.fenced_txn``) that also compares the record's
``mod_revision``, so two agents racing to commit the same or different steps cannot move it backwards,
and that no manifest of the step changed since it read them (one range compare over their prefix).
``CommitExecutor.withdraw`` takes a holder off a manifest before its copy is overwritten, in a transaction
that compares the commit record: a withdrawal and a commit that counted the copy cannot both succeed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable, Mapping

from resilient import failpoints
from resilient.errors import ReplicationError
from resilient.etcd.api import Compare, Get, KVStore, Put
from resilient.keys import JobKeys
from resilient.logs import get_logger
from resilient.replication.manifest import CommitRecord, ShardManifest, parse_ckpt_key

log = get_logger(__name__)

COMMIT = "commit"
WAIT = "wait"
STALE = "stale"


@dataclass(frozen=True)
class CommitDecision:
    action: str  # COMMIT | WAIT | STALE
    reason: str
    missing: tuple[int, ...] = ()  # ranks without enough verified copies (WAIT)


def decide(
    generation: int,
    world_size: int,
    step: int,
    manifests: Mapping[int, ShardManifest],
    required: int,
    current: CommitRecord | None,
) -> CommitDecision:
    if current is not None and current.step >= step:
        return CommitDecision(STALE, f"step {current.step} is already committed (>= {step})")
    missing = []
    for rank in range(world_size):
        m = manifests.get(rank)
        if (
            m is None
            or m.step != step
            or m.generation != generation
            or m.world_size != world_size
            or len(set(m.holders)) < required
        ):
            missing.append(rank)
    if missing:
        return CommitDecision(WAIT, f"ranks {missing} have fewer than {required} verified copies of step {step}", tuple(missing))
    return CommitDecision(COMMIT, f"all {world_size} shards of step {step} have >= {required} copies")


def prunable(manifest_keys: Iterable[tuple[int, int, int]], committed: CommitRecord) -> list[tuple[int, int, int]]:
    """Manifests to delete once ``committed`` is the commit record: everything except the committed step's
    own manifests and newer steps of the committed or a newer generation (still in flight)."""
    out = []
    for g, s, r in manifest_keys:
        if (g, s) == (committed.generation, committed.step):
            continue
        if g >= committed.generation and s > committed.step:
            continue
        out.append((g, s, r))
    return out


def read_commit(kv: KVStore, keys: JobKeys) -> tuple[CommitRecord | None, int]:
    """The commit record and its ``mod_revision`` (0 when absent)."""
    kv_ = kv.get(keys.committed)
    if kv_ is None:
        return None, 0
    return CommitRecord.decode(kv_.value), kv_.mod_revision


def read_manifests(kv: KVStore, keys: JobKeys, generation: int, step: int) -> dict[int, ShardManifest]:
    return read_manifests_at(kv, keys, generation, step)[0]


def read_manifests_at(kv: KVStore, keys: JobKeys, generation: int, step: int) -> tuple[dict[int, ShardManifest], int]:
    """The manifests of ``step`` and the store revision they were read at."""
    items, revision = kv.get_prefix(keys.ckpt_step_prefix(generation, step))
    out: dict[int, ShardManifest] = {}
    for item in items:
        parsed = parse_ckpt_key(keys, item.key)
        if parsed is not None:
            out[parsed[2]] = ShardManifest.decode(item.value)
    return out, revision


def _commit_guard(keys: JobKeys, mod: int) -> Compare:
    """The commit record is still the one read at ``mod`` (0: there was none)."""
    return Compare(keys.committed, "mod", "==", mod) if mod else Compare(keys.committed, "version", "==", 0)


class CommitExecutor:
    """Applies commit decisions in etcd; every write fenced by the caller's generation."""

    def __init__(self, kv: KVStore, keys: JobKeys, rendezvous: object, attempts: int = 8) -> None:
        self.kv = kv
        self.keys = keys
        self.rendezvous = rendezvous
        self.attempts = attempts

    def try_commit(self, generation: int, world_size: int, step: int, required: int, replicas: int, *,
                   node_id: str | None = None, holds: Callable[[int], bool] | None = None) -> CommitDecision:
        """Commit ``step`` if ``decide`` allows; raises FencedError when ``generation`` is stale.

        ``node_id``/``holds``: this node's claims as a holder count only for the ranks whose copy it still
        ``holds`` (a worker may seal a newer snapshot over an uncommitted one after its manifest named this
        node; committing on that claim would commit a step whose copy is gone)."""
        decision = CommitDecision(WAIT, "not tried")
        for _ in range(self.attempts):
            current, mod = read_commit(self.kv, self.keys)
            manifests, read_at = read_manifests_at(self.kv, self.keys, generation, step)
            if node_id is not None and holds is not None:
                manifests = {r: m if node_id not in m.holders or holds(r) else
                             replace(m, holders=tuple(h for h in m.holders if h != node_id))
                             for r, m in manifests.items()}
            decision = decide(generation, world_size, step, manifests, required, current)
            if decision.action != COMMIT:
                return decision
            record = CommitRecord(step=step, generation=generation, world_size=world_size, replicas=required)
            # the manifests read must still be the manifests: a holder that withdrew its claim since (its copy
            # is about to be overwritten, ``withdraw``) fails the transaction, and the next attempt reads again
            unchanged = Compare(self.keys.ckpt_step_prefix(generation, step), "mod", "<", read_at + 1, prefix=True)
            failpoints.hit("repl.commit.before_txn", step=step, gen=generation)
            result = self.rendezvous.fenced_txn(generation, [_commit_guard(self.keys, mod), unchanged],  # type: ignore[attr-defined]
                                                [Put(self.keys.committed, record.encode())])
            if result.succeeded:
                failpoints.hit("repl.commit.after_txn", step=step, gen=generation)
                log.info("committed step %d (generation %d, %d ranks, %d copies each)", step, generation, world_size, required)
                return decision
        return CommitDecision(WAIT, f"the commit record kept changing under {self.attempts} attempts to commit step {step}")

    def withdraw(self, generation: int, step: int, rank: int, node_id: str) -> CommitRecord | None:
        """Take ``node_id`` off the holders of ``rank``'s shard of ``step`` (sealed in ``generation``) unless
        that step is committed: called before that copy is overwritten. Returns the commit record when the
        step is committed (the copy must stay), None when the claim is gone or was never made.

        The rewrite is one transaction that also compares the commit record, and ``try_commit`` compares
        the manifests it read, so either the commit lands first (and this returns it) or the withdrawal
        does (and the commit is decided again without this copy)."""
        key = self.keys.ckpt(generation, step, rank)
        for _ in range(self.attempts):
            # the commit record and the manifest in one round trip (a read-only transaction)
            commit_kvs, manifest_kvs = self.kv.txn([], [Get(self.keys.committed), Get(key)]).responses
            current = CommitRecord.decode(commit_kvs[0].value) if commit_kvs else None
            mod = commit_kvs[0].mod_revision if commit_kvs else 0
            if current is not None and current.step >= step:
                # committed, or superseded by a newer commit (then it can never commit)
                return current if (current.step, current.generation) == (step, generation) else None
            if not manifest_kvs:
                return None
            item = manifest_kvs[0]
            manifest = ShardManifest.decode(item.value)
            if node_id not in manifest.holders:
                return None
            rest = replace(manifest, holders=tuple(h for h in manifest.holders if h != node_id))
            result = self.kv.txn([Compare(key, "mod", "==", item.mod_revision), _commit_guard(self.keys, mod)],
                                 [Put(key, rest.encode())])
            if result.succeeded:
                log.debug("withdrew %s's copy of rank %d step %d (generation %d)", node_id, rank, step, generation)
                return None
        raise ReplicationError(
            f"the manifest of rank {rank} step {step} or the commit record kept changing under {self.attempts} attempts "
            f"to withdraw {node_id}'s copy; that copy is kept"
        )

    def prune(self, committed: CommitRecord) -> int:
        """Delete manifests made garbage by ``committed`` (see ``prunable``); returns how many."""
        items, _ = self.kv.get_prefix(self.keys.ckpt_prefix)
        parsed = [p for p in (parse_ckpt_key(self.keys, i.key) for i in items) if p is not None]
        doomed = prunable(parsed, committed)
        for g, s, r in doomed:
            self.kv.delete(self.keys.ckpt(g, s, r))
        return len(doomed)

    def write_manifest(self, generation: int, manifest: ShardManifest) -> None:
        """Write (or update) the manifest of one shard; raises FencedError when ``generation`` is stale."""
        key = self.keys.ckpt(manifest.generation, manifest.step, manifest.rank)
        self.rendezvous.fenced_txn(generation, [], [Put(key, manifest.encode())])  # type: ignore[attr-defined]


__all__ = ["COMMIT", "WAIT", "STALE", "CommitDecision", "CommitExecutor", "decide", "prunable", "read_commit", "read_manifests",
           "read_manifests_at"]

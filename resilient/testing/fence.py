"""``NodeFence``: the rendezvous' fencing for one node without an agent (tests, benchmarks).

A ``ShardManager`` or ``CommitExecutor`` writes manifests and commits through ``rendezvous.fenced_txn``;
an agent's rendezvous provides it. Outside an agent this holds what it needs: a lease, the node's
record on that lease, and ``fenced_txn`` over both (``resilient.rendezvous.executor.fenced_txn``)."""

from __future__ import annotations

from resilient.keys import JobKeys
from resilient.rendezvous.executor import fenced_txn
from resilient.rendezvous.model import NodeInfo


class NodeFence:
    def __init__(self, kv, keys: JobKeys, node: NodeInfo, ttl: int = 120) -> None:
        self.kv, self.keys, self.node = kv, keys, node
        self.lease = kv.lease_grant(ttl)
        kv.put(keys.node(node.node_id), node.to_json(), lease=self.lease)

    def fenced_txn(self, generation, compares, success, failure=()):
        return fenced_txn(self.kv, self.keys, generation, self.node.node_id, self.lease, compares, success, failure)

    def revoke(self) -> None:
        self.kv.lease_revoke(self.lease)


__all__ = ["NodeFence"]

"""Peer replication of snapshot shards, checkpoint commit in etcd, and restore from any holder.

``ShardManager`` (manager.py) is what the node agent uses. Pure decisions: ``placement`` (which hosts hold
each shard), ``commit`` (when a step is committed; plus its fenced executor), ``restore`` (whose shard a
rank restores and from where), ``ratelimit``. Around them: ``manifest`` (etcd records), ``local`` (this
agent's segments), ``peer_service`` (agent <-> agent gRPC control), ``settings``.
"""

from resilient.replication.manager import ShardManager
from resilient.replication.settings import ReplicationSettings

__all__ = ["ReplicationSettings", "ShardManager"]

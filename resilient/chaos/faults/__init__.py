"""Fault actions, one module per family; ``ACTIONS`` maps each action name to its driver."""

from __future__ import annotations

from resilient.chaos.faults.base import Driver, Injection, Plan
from resilient.chaos.faults.etcd import EtcdKill
from resilient.chaos.faults.failpoint import Failpoint
from resilient.chaos.faults.host import HostLoss, ScaleUp
from resilient.chaos.faults.network import Partition, SlowLink
from resilient.chaos.faults.process import Hang, KillAgent, KillWorker, PauseNode
from resilient.chaos.faults.storage import CorruptReplica, DiskFull

ACTIONS: dict[str, Driver] = {d.name: d for d in (
    KillWorker(), Hang(), KillAgent(), PauseNode(), HostLoss(), ScaleUp(), EtcdKill(), Partition(), SlowLink(),
    CorruptReplica(), DiskFull(), Failpoint(),
)}

__all__ = ["ACTIONS", "Driver", "Injection", "Plan"]

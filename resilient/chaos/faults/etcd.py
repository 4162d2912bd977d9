"""etcd faults: SIGKILL one member (params.member: leader, follower, or an index) of a 3-member cluster
(or the single member), restarted on heal (default 3 s later)."""

from __future__ import annotations

from typing import Any

from resilient.chaos.faults.base import Driver, Injection
from resilient.chaos.scenario import Fault, ScenarioError, Topology
from resilient.errors import ChaosError
from resilient.etcd.server import EmbeddedCluster


class EtcdKill(Driver):
    name = "etcd_kill"
    reactions = ("step.done",)
    accepts_target = ("member",)

    @classmethod
    def validate(cls, target, params, topology: Topology, where: str) -> None:
        member = target.get("member", "leader")
        if member not in ("leader", "follower") and not (isinstance(member, int) and 0 <= member < topology.etcd_members):
            raise ScenarioError(f"{where}: target.member={member!r}; use leader, follower or an index "
                                f"below {topology.etcd_members}.")

    def inject(self, fault: Fault, cluster: Any) -> Injection:
        etcd = cluster.etcd
        member = fault.target.get("member", "leader")
        if not isinstance(etcd, EmbeddedCluster):
            etcd.kill()
            return Injection(fields={"member": 0, "role": "only"}, state=None)
        leader = etcd.leader(timeout=5.0)
        if member == "leader":
            idx = leader
        elif member == "follower":
            idx = next(i for i in range(len(etcd.members)) if i != leader and etcd.running(i))
        else:
            idx = int(member)
        if not etcd.running(idx):
            raise ChaosError(f"Fault {fault.id}: etcd member {idx} is not running.")
        etcd.kill(idx)
        return Injection(fields={"member": idx, "role": "leader" if idx == leader else "follower",
                                 "endpoint": etcd.endpoint(idx)}, state=idx)

    def heal(self, fault: Fault, cluster: Any, injection: Injection) -> dict[str, Any] | None:
        etcd = cluster.etcd
        if injection.state is None:
            etcd.restart()
            return {"member": 0}
        etcd.restart(injection.state)
        return {"member": injection.state, "leader_now": etcd.leader(timeout=10.0)}

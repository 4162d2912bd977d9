"""Network faults: partition a host (network namespaces + iptables: full, data plane only, or one
direction) and slow or blackhole a host's link to etcd (userspace proxy; this kernel has no netem)."""

from __future__ import annotations

from typing import Any

from resilient.chaos.faults.base import Driver, Injection, Plan, need_host, param_choice, param_number
from resilient.chaos.scenario import Fault, ScenarioError, Topology
from resilient.errors import ChaosError


class Partition(Driver):
    """params.mode: full (the host loses everyone, etcd included), data (only its peers; etcd still
    reachable), oneway (peers' packets to it are dropped, its own still leave)."""

    name = "partition"
    requires = ("root", "netns", "iptables")
    reactions = ("gen.formed",)
    takes_host = True
    accepts_params = ("mode",)

    @classmethod
    def validate(cls, target, params, topology: Topology, where: str) -> None:
        need_host(target, topology, where)
        param_choice(params, "mode", ("full", "data", "oneway"), "full", where)
        if topology.network != "netns":
            raise ScenarioError(f"{where}: partition needs topology.network: netns.")

    def inject(self, fault: Fault, cluster: Any) -> Injection:
        net = cluster.network
        name = fault.target["host"]
        mode = fault.params.get("mode", "full")
        peers = [h.ip for n, h in net.hosts.items() if n != name]
        if mode == "full":
            net.isolate(name)
        elif mode == "data":
            net.drop(name, peers)
        else:
            net.drop(name, peers, inbound=True, outbound=False)
        return Injection(fields={"host": name, "mode": mode, "rules": net.rules(name)})

    def heal(self, fault: Fault, cluster: Any, injection: Injection) -> dict[str, Any] | None:
        cluster.network.heal(fault.target["host"])
        return {"host": fault.target["host"], "rules_left": cluster.network.rules(fault.target["host"])}


class SlowLink(Driver):
    """Delay (params.delay_ms) or blackhole (params.blackhole: true) a host's link to etcd through its
    own proxy; heal restores it."""

    name = "slow_link"
    reactions = ("step.done",)
    accepts_params = ("delay_ms", "blackhole")

    @classmethod
    def validate(cls, target, params, topology: Topology, where: str) -> None:
        need_host(target, topology, where)
        param_number(params, "delay_ms", 100, where)
        if not isinstance(params.get("blackhole", False), bool):
            raise ScenarioError(f"{where}: params.blackhole must be true or false.")
        if params.get("blackhole") and "delay_ms" in params:
            raise ScenarioError(f"{where}: params.delay_ms has no effect with blackhole: true (nothing gets "
                                "through); remove one of them.")

    def prepare(self, fault: Fault, plan: Plan, topology: Topology) -> None:
        plan.proxied.add(fault.target["host"])

    def inject(self, fault: Fault, cluster: Any) -> Injection:
        host = cluster.hosts[fault.target["host"]]
        carried = sum(p.chunks for p in host.etcd_proxy)
        if not carried:
            raise ChaosError(f"Fault {fault.id}: no etcd traffic of host {host.name} went through its proxies "
                             f"{[p.endpoint for p in host.etcd_proxy]}; slowing them would do nothing.")
        for p in host.etcd_proxy:
            if fault.params.get("blackhole"):
                p.blackhole(True)
            else:
                p.set_delay(float(fault.params.get("delay_ms", 100)))
        return Injection(fields={"host": host.name, "proxies": [p.endpoint for p in host.etcd_proxy],
                                 "delay_ms": fault.params.get("delay_ms", 100),
                                 "blackhole": bool(fault.params.get("blackhole")), "chunks_before": carried})

    def heal(self, fault: Fault, cluster: Any, injection: Injection) -> dict[str, Any] | None:
        proxies = cluster.hosts[fault.target["host"]].etcd_proxy
        for p in proxies:
            p.set_delay(0)
            p.blackhole(False)
        return {"host": fault.target["host"], "delayed_chunks": sum(p.delayed_chunks for p in proxies)}

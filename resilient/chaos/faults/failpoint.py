"""Failpoint faults: arm a named failpoint (``resilient.failpoints``) in a host's processes through
``$RESILIENT_FAILPOINTS`` at launch; the evidence is its ``failpoint.fired`` event. Used to kill at
each step of the commit and persist sequences (``panic``) or to raise/``enospc`` there. heal with
``action: restart`` starts the host again with the failpoint disarmed."""

from __future__ import annotations

from typing import Any, Mapping

from resilient import failpoints
from resilient.chaos.faults.base import Driver, Injection, Plan, need_host
from resilient.chaos.scenario import Fault, ScenarioError, Topology
from resilient.errors import ConfigError


class Failpoint(Driver):
    name = "failpoint"
    reactions = ()
    takes_host = True
    accepts_params = ("name", "action")

    @classmethod
    def validate(cls, target, params, topology: Topology, where: str) -> None:
        need_host(target, topology, where)
        name = params.get("name")
        if not isinstance(name, str) or not name:
            raise ScenarioError(f"{where}: params.name must name a failpoint, e.g. persist.shard.after_write.")
        try:
            failpoints.parse_action(str(params.get("action", "1*panic")), name=name)
        except ConfigError as exc:
            raise ScenarioError(f"{where}: {exc}") from exc

    def prepare(self, fault: Fault, plan: Plan, topology: Topology) -> None:
        if fault.trigger.kind != "at":
            raise ScenarioError(f"fault {fault.id}: a failpoint is armed at launch; use trigger {{at: start}}.")
        plan.arm(fault.target["host"], fault.params["name"], str(fault.params.get("action", "1*panic")))

    def armed_at_launch(self, fault: Fault) -> bool:
        return True

    def inject(self, fault: Fault, cluster: Any) -> Injection:
        return Injection(deferred=True)

    def evidence(self, fault: Fault, ev: Mapping[str, Any]) -> bool:
        from resilient.chaos.eventlog import host_of

        return (ev.get("kind") == "failpoint.fired" and ev.get("name") == fault.params["name"]
                and host_of(ev) == fault.target["host"])

    def heal(self, fault: Fault, cluster: Any, injection: Injection) -> dict[str, Any] | None:
        host = cluster.hosts[fault.target["host"]]
        if host.running():
            return {"host": host.name, "note": "still running; not restarted"}
        host = cluster.start_host(host.name, disarm=True)
        return {"host": host.name, "pid": host.pid, "restarted": True}

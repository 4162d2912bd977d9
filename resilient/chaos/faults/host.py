"""Whole-host faults: lose a host (silence first, then kill everything and drop its shared memory) and
scale up (start a host that was declared ``start: deferred``)."""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

from resilient.chaos.faults.base import Driver, Injection, need_host, param_number
from resilient.chaos.scenario import Fault, ScenarioError, Topology
from resilient.chaos.teardown import wait_gone
from resilient.errors import ChaosError


class HostLoss(Driver):
    """Silence the host (netns: DROP everything in its namespace; loopback: SIGSTOP all its processes, so
    peers see no reset), wait params.silence_s (default 1 s), then SIGKILL every process of the host and
    remove the shared-memory segments it held."""

    name = "host_loss"
    reactions = ("gen.formed", "restore.done")
    takes_host = True
    accepts_params = ("silence_s",)

    @classmethod
    def validate(cls, target, params, topology: Topology, where: str) -> None:
        need_host(target, topology, where)
        param_number(params, "silence_s", 1.0, where)

    def requirements(self, fault: Fault) -> tuple[str, ...]:
        return ()

    def inject(self, fault: Fault, cluster: Any) -> Injection:
        name = fault.target["host"]
        host = cluster.hosts[name]
        if not host.running():
            raise ChaosError(f"Fault {fault.id}: host {name} is not running.")
        procs = host.processes()
        pids = [p.pid for p in procs]
        segments = cluster.segments_of(name)
        if cluster.network is not None:
            cluster.network.isolate(name)
            how = "iptables DROP in its namespace"
        else:
            cluster.signal_host(name, signal.SIGSTOP)
            how = "SIGSTOP of all its processes"
        host.lost = True

        def kill() -> dict[str, Any]:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            # Dead before anything else happens to the host (a heal starting its replacement must not see
            # the old agent as still running): reap the agent, wait for the rest.
            if host.proc is not None:
                try:
                    host.proc.wait(timeout=10.0)
                except subprocess.TimeoutExpired as exc:
                    raise ChaosError(f"Fault {fault.id}: host {name}'s agent survived SIGKILL for 10s.") from exc
            wait_gone(pids, 10.0)
            removed = []
            for seg in sorted(segments):
                try:
                    os.unlink(seg)
                    removed.append(seg)
                except FileNotFoundError:
                    pass
            # The agent's control blocks live in /dev/shm/rsl-agent-<pid>-*: the host's memory too.
            removed += cluster.remove_agent_dirs(name)
            return {"killed": len(pids), "segments_removed": removed}

        silence = float(fault.params.get("silence_s", 1.0))
        return Injection(fields={"host": name, "silenced_by": how, "pids": pids, "segments": sorted(segments)},
                         followups=[(silence, kill)])

    def heal(self, fault: Fault, cluster: Any, injection: Injection) -> dict[str, Any] | None:
        name = fault.target["host"]
        if cluster.network is not None:
            cluster.network.heal(name)
        host = cluster.start_host(name, disarm=True)
        return {"host": name, "pid": host.pid, "restarted": True}


class ScaleUp(Driver):
    """Start a host declared ``start: deferred`` mid-training; it must join at a step boundary."""

    name = "scale_up"
    reactions = ("gen.formed",)

    @classmethod
    def validate(cls, target, params, topology: Topology, where: str) -> None:
        host = need_host(target, topology, where)
        if topology.host(host).start != "deferred":
            raise ScenarioError(f"{where}: scale_up target {host} must be declared with start: deferred.")

    def inject(self, fault: Fault, cluster: Any) -> Injection:
        host = cluster.start_host(fault.target["host"])
        return Injection(fields={"host": host.name, "pid": host.pid})

"""Faults on single processes: kill a worker, hang a worker, kill an agent, pause a node past its lease.

Worker faults by signal are sent by the harness to the pid the agent reported in ``worker.start``;
faults only the worker can cause itself (a segfault through ctypes, a Python exception, C code holding
the GIL) go through the in-worker hook (``resilient.chaos.inworker``) at the trigger's step.
"""

from __future__ import annotations

import signal
from typing import Any, Mapping

from resilient.chaos.faults.base import Driver, Injection, Plan, need_host, param_choice, param_number
from resilient.chaos.scenario import Fault, ScenarioError, Topology
from resilient.errors import ChaosError

SIGNALS = ("KILL", "SEGV", "TERM", "ABRT", "BUS")


def _pick_worker(cluster: Any, fault: Fault) -> tuple[int, Mapping[str, Any]]:
    host = fault.target["host"]
    workers = cluster.workers_of(host)
    if not workers:
        raise ChaosError(f"Fault {fault.id}: host {host} has no live worker to act on (none reported worker.start).")
    rank = fault.target.get("rank")
    if rank is not None:
        for pid, ev in workers:
            if ev.get("rank") == rank:
                return pid, ev
        raise ChaosError(f"Fault {fault.id}: no live worker with rank {rank} on host {host}.")
    return workers[-1]


def _inworker_step(fault: Fault, where: str) -> int:
    if fault.trigger.kind != "step":
        raise ScenarioError(f"{where}: in-worker faults need a step trigger ({{step: N}}).")
    return int(fault.trigger.value)


class KillWorker(Driver):
    """params.mode: signal (params.signal: KILL|SEGV|TERM|ABRT|BUS), segfault, exception; params.repeat."""

    name = "kill_worker"
    reactions = ("worker.exit",)
    accepts_params = ("mode", "signal", "repeat")
    accepts_target = ("host", "rank", "local_rank")

    @classmethod
    def validate(cls, target, params, topology: Topology, where: str) -> None:
        need_host(target, topology, where)
        mode = param_choice(params, "mode", ("signal", "segfault", "exception"), "signal", where)
        param_choice(params, "signal", SIGNALS, "KILL", where)
        if not isinstance(params.get("repeat", False), bool):
            raise ScenarioError(f"{where}: params.repeat={params['repeat']!r} must be true or false.")
        if mode != "signal" and "local_rank" not in target:
            raise ScenarioError(f"{where}: in-worker modes need target.local_rank.")
        if mode != "signal" and "signal" in params:
            raise ScenarioError(f"{where}: params.signal applies only to mode: signal (mode {mode} does not send "
                                "one); remove it or use mode: signal.")
        if mode == "signal" and "repeat" in params:
            raise ScenarioError(f"{where}: params.repeat applies only to the in-worker modes segfault and "
                                "exception (a signal is sent once); remove it or change the mode.")

    def requirements(self, fault: Fault) -> tuple[str, ...]:
        return ("chaos_hooks",) if fault.params.get("mode", "signal") != "signal" else ()

    def armed_at_launch(self, fault: Fault) -> bool:
        return fault.params.get("mode", "signal") != "signal"

    def prepare(self, fault: Fault, plan: Plan, topology: Topology) -> None:
        mode = fault.params.get("mode", "signal")
        if mode == "signal":
            return
        step = _inworker_step(fault, fault.id)
        action = "segv" if mode == "segfault" else "raise"
        rep = ":repeat" if fault.params.get("repeat") else ""
        plan.hook(fault.target["host"], f"{fault.id}:{action}:{step}:{int(fault.target['local_rank'])}{rep}")

    def inject(self, fault: Fault, cluster: Any) -> Injection:
        if fault.params.get("mode", "signal") != "signal":
            return Injection(deferred=True)
        pid, ev = _pick_worker(cluster, fault)
        sig = getattr(signal, "SIG" + str(fault.params.get("signal", "KILL")))
        import os

        os.kill(pid, sig)
        return Injection(fields={"host": fault.target["host"], "pid": pid, "rank": ev.get("rank"),
                                 "signal": sig.name})

    def evidence(self, fault: Fault, ev: Mapping[str, Any]) -> bool:
        return ev.get("kind") == "chaos.inworker" and ev.get("id") == fault.id


class Hang(Driver):
    """params.mode: sigstop (the harness stops the worker), gil (C code holding the GIL, in-worker) or sleep
    (in-worker, the GIL released: as a CUDA synchronisation on a collective whose peer is gone; the worker
    beats no more but its threads run, so it is caught by the hang timeout, or by the leave timeout once
    another fault makes the agent announce a new generation)."""

    name = "hang"
    reactions = ("worker.hang",)
    accepts_params = ("mode", "seconds")
    accepts_target = ("host", "rank", "local_rank")
    IN_WORKER = ("gil", "sleep")

    @classmethod
    def validate(cls, target, params, topology: Topology, where: str) -> None:
        need_host(target, topology, where)
        mode = param_choice(params, "mode", ("sigstop", *cls.IN_WORKER), "sigstop", where)
        param_number(params, "seconds", 3600, where)
        if mode in cls.IN_WORKER and "local_rank" not in target:
            raise ScenarioError(f"{where}: the {mode} mode needs target.local_rank.")
        if mode not in cls.IN_WORKER and "seconds" in params:
            raise ScenarioError(f"{where}: params.seconds applies only to the gil and sleep modes (sigstop holds "
                                "the worker until the heal); remove it or set heal.after.")

    def _in_worker(self, fault: Fault) -> bool:
        return fault.params.get("mode") in self.IN_WORKER

    def requirements(self, fault: Fault) -> tuple[str, ...]:
        return ("chaos_hooks",) if self._in_worker(fault) else ()

    def armed_at_launch(self, fault: Fault) -> bool:
        return self._in_worker(fault)

    def prepare(self, fault: Fault, plan: Plan, topology: Topology) -> None:
        if self._in_worker(fault):
            step = _inworker_step(fault, fault.id)
            secs = param_number(fault.params, "seconds", 3600, fault.id)
            mode = fault.params["mode"]
            plan.hook(fault.target["host"], f"{fault.id}:{mode}({secs:g}):{step}:{int(fault.target['local_rank'])}")

    def inject(self, fault: Fault, cluster: Any) -> Injection:
        if self._in_worker(fault):
            return Injection(deferred=True)
        import os

        pid, ev = _pick_worker(cluster, fault)
        os.kill(pid, signal.SIGSTOP)
        return Injection(fields={"host": fault.target["host"], "pid": pid, "rank": ev.get("rank"),
                                 "signal": "SIGSTOP"}, state=pid)

    def evidence(self, fault: Fault, ev: Mapping[str, Any]) -> bool:
        return ev.get("kind") == "chaos.inworker" and ev.get("id") == fault.id

    def heal(self, fault: Fault, cluster: Any, injection: Injection) -> dict[str, Any] | None:
        import os

        if isinstance(injection.state, int):
            try:
                os.kill(injection.state, signal.SIGCONT)
            except ProcessLookupError:
                return {"pid": injection.state, "note": "already gone"}
        return {"pid": injection.state}


class KillAgent(Driver):
    """SIGKILL one host's ``resilient-run``; its workers must not outlive it. heal: restart the host."""

    name = "kill_agent"
    reactions = ("gen.formed",)
    takes_host = True

    @classmethod
    def validate(cls, target, params, topology: Topology, where: str) -> None:
        need_host(target, topology, where)

    def inject(self, fault: Fault, cluster: Any) -> Injection:
        host = cluster.hosts[fault.target["host"]]
        if not host.running():
            raise ChaosError(f"Fault {fault.id}: the agent of {host.name} is not running.")
        host.proc.send_signal(signal.SIGKILL)
        host.lost = True
        return Injection(fields={"host": host.name, "pid": host.pid, "signal": "SIGKILL"})

    def heal(self, fault: Fault, cluster: Any, injection: Injection) -> dict[str, Any] | None:
        host = cluster.start_host(fault.target["host"], disarm=True)
        return {"host": host.name, "pid": host.pid, "restarted": True}


class PauseNode(Driver):
    """SIGSTOP a host's agent for params.seconds (default lease TTL + 2 s), then SIGCONT: it must be fenced."""

    name = "pause_node"
    reactions = ("gen.formed",)
    takes_host = True
    accepts_params = ("seconds",)

    @classmethod
    def validate(cls, target, params, topology: Topology, where: str) -> None:
        need_host(target, topology, where)
        param_number(params, "seconds", 0, where)

    def inject(self, fault: Fault, cluster: Any) -> Injection:
        host = cluster.hosts[fault.target["host"]]
        if not host.running():
            raise ChaosError(f"Fault {fault.id}: the agent of {host.name} is not running.")
        seconds = float(fault.params.get("seconds") or cluster.scenario.runtime.lease_ttl + 2)
        pid = host.pid
        host.proc.send_signal(signal.SIGSTOP)

        def resume() -> dict[str, Any]:
            import os

            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                return {"resumed": False}
            return {"resumed": True, "pid": pid}

        return Injection(fields={"host": host.name, "pid": pid, "seconds": seconds}, followups=[(seconds, resume)])

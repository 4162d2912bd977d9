"""The contract every fault action implements, and the plan that actions fill in before launch.

A driver declares the params and target keys it reads (``accepts_params``, ``accepts_target``: the
scenario loader refuses any other) and validates their values at load time (``validate``), arms what
must be armed before the hosts start (``prepare``: failpoints, in-worker hooks, proxies), injects when
its trigger is due (``inject``), and heals (``heal``). ``inject`` returns an ``Injection``: the evidence fields for the
``fault.fired`` event, or ``deferred=True`` when the evidence comes later from the process itself (a
failpoint or an in-worker hook), in which case ``evidence(event)`` recognises it. ``followups`` are
further timed steps of the same injection (resume after a pause, kill after a blackhole).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from resilient.chaos.scenario import Fault, ScenarioError, Topology

if TYPE_CHECKING:
    from resilient.chaos.topology import Cluster


@dataclass
class Plan:
    """What must be armed before launch: failpoint terms and in-worker hooks per host, proxied hosts."""

    failpoints: dict[str, list[str]] = field(default_factory=dict)
    inworker: dict[str, list[str]] = field(default_factory=dict)
    proxied: set[str] = field(default_factory=set)
    failpoint_names: set[str] = field(default_factory=set)

    def arm(self, host: str, name: str, action: str) -> None:
        self.failpoints.setdefault(host, []).append(f"{name}={action}")
        self.failpoint_names.add(name)

    def hook(self, host: str, spec: str) -> None:
        self.inworker.setdefault(host, []).append(spec)


@dataclass
class Injection:
    fields: dict[str, Any] = field(default_factory=dict)
    deferred: bool = False
    followups: list[tuple[float, Callable[[], dict[str, Any] | None]]] = field(default_factory=list)
    state: Any = None


class Driver(abc.ABC):
    name = ""
    requires: tuple[str, ...] = ()
    reactions: tuple[str, ...] = ()
    takes_host: bool = False  # the target host is expected to die or be fenced (exit code may be non-zero)
    # what the action reads from ``params`` and ``target``: anything else in a scenario is refused at load
    # (a misspelt key would otherwise be ignored and the default used in silence)
    accepts_params: tuple[str, ...] = ()
    accepts_target: tuple[str, ...] = ("host",)

    @classmethod
    def validate(cls, target: Mapping[str, Any], params: Mapping[str, Any], topology: Topology, where: str) -> None:
        """Refuse a bad target or params with a ScenarioError naming the field."""

    def requirements(self, fault: Fault) -> tuple[str, ...]:
        return self.requires

    def armed_at_launch(self, fault: Fault) -> bool:
        """True when ``prepare`` armed the fault inside the processes (failpoint, in-worker hook): its
        evidence may arrive before the trigger would match, so the runner awaits it from launch."""
        return False

    def prepare(self, fault: Fault, plan: Plan, topology: Topology) -> None:
        """Arm what must exist before the hosts start."""

    @abc.abstractmethod
    def inject(self, fault: Fault, cluster: "Cluster") -> Injection:
        """Break something now; return the evidence (or ``deferred=True``) and any timed follow-ups."""

    def evidence(self, fault: Fault, ev: Mapping[str, Any]) -> bool:
        return False

    def heal(self, fault: Fault, cluster: "Cluster", injection: Injection) -> dict[str, Any] | None:
        return None


def need_host(target: Mapping[str, Any], topology: Topology, where: str) -> str:
    host = target.get("host")
    if host is None:
        raise ScenarioError(f"{where}: target.host is required (one of {[h.name for h in topology.hosts]}).")
    return str(host)


def param_choice(params: Mapping[str, Any], key: str, choices: tuple[str, ...], default: str, where: str) -> str:
    value = params.get(key, default)
    if value not in choices:
        raise ScenarioError(f"{where}: params.{key}={value!r}; use one of {list(choices)}.")
    return str(value)


def param_number(params: Mapping[str, Any], key: str, default: float, where: str) -> float:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ScenarioError(f"{where}: params.{key}={value!r} must be a non-negative number.")
    return float(value)

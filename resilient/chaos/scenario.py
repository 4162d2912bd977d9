"""The scenario file: a typed, validated schema for one chaos experiment (YAML under ``chaos/scenarios/``).

A scenario names the topology (etcd members; hosts and their workers; loopback or network namespaces),
the training and runtime settings, the faults (trigger, action, target, heal) and what must be observed
(outcome, reactions, bounds). ``load(path)`` parses and validates; every error names the file, the field
and what to write instead. Nothing here starts a process.

Triggers (exactly one key besides the optional ``host``/``delay``):
  ``{step: N}``                     first ``step.done`` with step >= N (on ``host`` if given); N < training.steps
  ``{event: KIND, where: {...}}``   first event of that kind whose fields match ``where`` (a known kind)
  ``{failpoint: NAME}``             the failpoint fires in the target host (armed as ``sleep(hold_ms)``)
  ``{time: S}``                     S seconds after the first completed step
  ``{after: FAULT_ID, delay: S}``   S seconds after another fault fired
  ``{at: start}``                   at launch (for actions armed in the environment)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from resilient.chaos.event_kinds import KNOWN_EVENT_KINDS, unknown_kind_hint
from resilient.errors import ChaosError

TIERS = ("ci", "full")
NETWORKS = ("loopback", "netns")
OUTCOMES = ("success", "failure")
TRIGGER_KINDS = ("step", "event", "failpoint", "time", "after", "at")
KNOWN_REQUIREMENTS = ("root", "netns", "iptables", "tmpfs", "chaos_hooks", "etcd_members>=3")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,40}$")
_HOST = re.compile(r"^[a-z][a-z0-9]{0,7}$")


class ScenarioError(ChaosError):
    """A scenario file is malformed; the message names the file, the field and the fix."""


def _err(where: str, msg: str) -> ScenarioError:
    return ScenarioError(f"{where}: {msg}")


def _only(d: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise _err(where, f"unknown field(s) {unknown}; allowed: {list(allowed)}.")


def _event_kind(kind: Any, where: str, label: str) -> str:
    """A kind some process emits (``event_kinds.KNOWN_EVENT_KINDS``): any other can never be observed."""
    if not isinstance(kind, str) or not kind:
        raise _err(where, f"{label}={kind!r} must be an event kind such as worker.exit.")
    if kind not in KNOWN_EVENT_KINDS:
        raise _err(where, f"{label}={kind!r} is not an event kind the runtime or the harness emits, so it would "
                          f"never be seen.{unknown_kind_hint(kind)}")
    return kind


def _num(d: Mapping[str, Any], key: str, default: float | None, where: str, *, minimum: float = 0.0,
         integer: bool = False) -> Any:
    value = d.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _err(where, f"{key}={value!r} must be a number.")
    if integer and int(value) != value:
        raise _err(where, f"{key}={value!r} must be a whole number.")
    if value < minimum:
        raise _err(where, f"{key}={value!r} must be >= {minimum:g}.")
    return int(value) if integer else float(value)


@dataclass(frozen=True)
class HostSpec:
    name: str
    workers: int = 1
    start: str = "launch"  # launch | deferred (started by a scale_up fault)


@dataclass(frozen=True)
class Topology:
    etcd_members: int = 1
    network: str = "loopback"
    hosts: tuple[HostSpec, ...] = ()

    def host(self, name: str) -> HostSpec:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    @property
    def max_nodes(self) -> int:
        return len(self.hosts)

    @property
    def launch_hosts(self) -> tuple[HostSpec, ...]:
        return tuple(h for h in self.hosts if h.start == "launch")


@dataclass(frozen=True)
class Training:
    steps: int = 40
    logical_shards: int = 4
    hidden: int = 32
    lr: float = 0.01
    step_sleep_ms: float = 50.0


@dataclass(frozen=True)
class Runtime:
    lease_ttl: int = 2
    hang_timeout: float = 3.0
    leave_timeout: float = 60.0  # resilient-run's --leave-timeout (its default)
    monitor_interval: float = 0.1
    max_restarts: int = 3
    replicas: int = 2
    snapshot_every: int = 1
    persist_every: int = 0
    persist_tmpfs_kb: int = 0  # >0: the persist dir is a tmpfs of that size (needs root)
    min_nodes: int = 1
    last_call: float = 0.0  # seconds a round waits for more nodes once min_nodes joined; 0: from the calibration


@dataclass(frozen=True)
class Trigger:
    kind: str
    value: Any
    host: str | None = None
    where: Mapping[str, Any] = field(default_factory=dict)
    delay: float = 0.0


@dataclass(frozen=True)
class Heal:
    after: float | None = None  # seconds after the fault fired; None: no heal
    action: str = "auto"  # auto: the action's own heal (resume, restart, remove rules...)


@dataclass(frozen=True)
class Fault:
    id: str
    trigger: Trigger
    action: str
    target: Mapping[str, Any]
    params: Mapping[str, Any]
    heal: Heal


@dataclass(frozen=True)
class Expect:
    outcome: str = "success"
    reactions: tuple[str, ...] = ()  # event kinds that must appear after the first fault
    events: tuple[Mapping[str, Any], ...] = ()  # {kind: K, where: {...}} that must appear anywhere
    restarts_min: int | None = None
    restarts_max: int | None = None
    generation_change: bool | None = None  # True: must change; False: must not
    final_world_size: int | None = None
    world_sizes: tuple[int, ...] | None = None  # distinct world sizes in order of appearance
    max_steps_recomputed: int | None = None
    recovery_s: float | str = "auto"
    exit_reason: str | None = None  # substring of agent.exit reason (for outcome: failure)
    committed_loss_allowed: bool = False


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    description: str
    tier: str
    requires: tuple[str, ...]
    seed: int
    exactness: str  # bitwise | approx | none
    rtol: float
    atol: float
    topology: Topology
    training: Training
    runtime: Runtime
    faults: tuple[Fault, ...]
    expect: Expect
    deadline_s: float | None  # None: derived from the calibration run
    slack: float

    def fault(self, fault_id: str) -> Fault:
        for f in self.faults:
            if f.id == fault_id:
                return f
        raise KeyError(fault_id)


def _topology(raw: Any, where: str) -> Topology:
    if not isinstance(raw, Mapping):
        raise _err(where, "topology must be a mapping with etcd, network and hosts.")
    _only(raw, ("etcd", "network", "hosts"), where)
    etcd = raw.get("etcd", {}) or {}
    if not isinstance(etcd, Mapping):
        raise _err(where, "topology.etcd must be a mapping such as {members: 1}.")
    _only(etcd, ("members",), f"{where}.etcd")
    members = _num(etcd, "members", 1, f"{where}.etcd", minimum=1, integer=True)
    if members not in (1, 3):
        raise _err(where, f"topology.etcd.members={members}; use 1 or 3.")
    network = raw.get("network", "loopback")
    if network not in NETWORKS:
        raise _err(where, f"topology.network={network!r}; use one of {list(NETWORKS)}.")
    hosts_raw = raw.get("hosts")
    if not isinstance(hosts_raw, list) or not hosts_raw:
        raise _err(where, "topology.hosts must be a non-empty list such as [{name: h0, workers: 1}].")
    hosts: list[HostSpec] = []
    for i, h in enumerate(hosts_raw):
        hw = f"{where}.hosts[{i}]"
        if not isinstance(h, Mapping):
            raise _err(hw, "each host must be a mapping {name, workers, start}.")
        _only(h, ("name", "workers", "start"), hw)
        name = h.get("name")
        if not isinstance(name, str) or not _HOST.match(name):
            raise _err(hw, f"name={name!r} must be 1-8 lowercase letters/digits starting with a letter (e.g. h0).")
        start = h.get("start", "launch")
        if start not in ("launch", "deferred"):
            raise _err(hw, f"start={start!r}; use launch or deferred (deferred hosts join via scale_up).")
        hosts.append(HostSpec(name=name, workers=_num(h, "workers", 1, hw, minimum=1, integer=True), start=start))
    names = [h.name for h in hosts]
    if len(set(names)) != len(names):
        raise _err(where, f"host names must be unique, got {names}.")
    if not any(h.start == "launch" for h in hosts):
        raise _err(where, "at least one host must start at launch.")
    return Topology(etcd_members=members, network=network, hosts=tuple(hosts))


def _dataclass_from(cls: type, raw: Any, where: str, ints: tuple[str, ...]) -> Any:
    raw = raw or {}
    if not isinstance(raw, Mapping):
        raise _err(where, f"must be a mapping of {list(cls.__dataclass_fields__)}.")
    fields = tuple(cls.__dataclass_fields__)
    _only(raw, fields, where)
    values = {}
    for name in fields:
        if name in raw:
            values[name] = _num(raw, name, None, where, integer=name in ints)
    return cls(**values)


def _trigger(raw: Any, where: str) -> Trigger:
    if not isinstance(raw, Mapping):
        raise _err(where, f"trigger must be a mapping with one of {list(TRIGGER_KINDS)}.")
    _only(raw, TRIGGER_KINDS + ("host", "where", "delay"), where)
    kinds = [k for k in TRIGGER_KINDS if k in raw]
    if len(kinds) != 1:
        raise _err(where, f"trigger needs exactly one of {list(TRIGGER_KINDS)}, got {kinds or 'none'}.")
    kind = kinds[0]
    value = raw[kind]
    if kind == "step":
        value = _num(raw, "step", None, where, integer=True)
    elif kind == "time":
        value = _num(raw, "time", None, where)
    elif kind in ("event", "failpoint", "after"):
        if not isinstance(value, str) or not value:
            raise _err(where, f"trigger {kind} must be a non-empty string.")
        if kind == "event":
            _event_kind(value, where, "trigger.event")
    elif kind == "at" and value != "start":
        raise _err(where, f"trigger at={value!r}; the only value is 'start'.")
    where_ = raw.get("where", {}) or {}
    if not isinstance(where_, Mapping):
        raise _err(where, "trigger.where must be a mapping of event fields to values.")
    if where_ and kind != "event":
        raise _err(where, "trigger.where applies only to event triggers.")
    host = raw.get("host")
    if host is not None and not isinstance(host, str):
        raise _err(where, f"trigger.host={host!r} must be a host name.")
    return Trigger(kind=kind, value=value, host=host, where=dict(where_),
                   delay=_num(raw, "delay", 0.0, where))


def _mapping(fault: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = fault.get(key) or {}
    if not isinstance(value, Mapping):
        raise _err(where, f"{key} must be a mapping such as {{host: h1}}, got {value!r}.")
    return dict(value)


def _accepted(given: Mapping[str, Any], accepted: tuple[str, ...], label: str, action: str, where: str) -> None:
    """Refuse keys the action never reads: a misspelt one would be ignored and its default used in silence."""
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        what = f"it reads only {sorted(accepted)}" if accepted else f"it takes no {label}"
        raise _err(where, f"{label} {unknown} unknown to action {action}: {what}.")


def _heal(raw: Any, where: str) -> Heal:
    if raw in (None, "none"):
        return Heal()
    if not isinstance(raw, Mapping):
        raise _err(where, "heal must be 'none' or a mapping {after: SECONDS, action: auto|restart}.")
    _only(raw, ("after", "action"), where)
    action = raw.get("action", "auto")
    if action not in ("auto", "restart"):
        raise _err(where, f"heal.action={action!r}; use auto or restart.")
    return Heal(after=_num(raw, "after", 0.0, where), action=action)


def _expect(raw: Any, where: str) -> Expect:
    raw = raw or {}
    if not isinstance(raw, Mapping):
        raise _err(where, "expect must be a mapping.")
    allowed = ("outcome", "reactions", "events", "restarts", "generation_change", "final_world_size",
               "world_sizes", "max_steps_recomputed", "recovery_s", "exit_reason", "committed_loss_allowed")
    _only(raw, allowed, where)
    outcome = raw.get("outcome", "success")
    if outcome not in OUTCOMES:
        raise _err(where, f"expect.outcome={outcome!r}; use one of {list(OUTCOMES)}.")
    reactions = raw.get("reactions", []) or []
    if not isinstance(reactions, list) or not all(isinstance(r, str) for r in reactions):
        raise _err(where, "expect.reactions must be a list of event kinds, e.g. [worker.exit, gen.formed].")
    for i, r in enumerate(reactions):
        _event_kind(r, where, f"expect.reactions[{i}]")
    evs = raw.get("events", []) or []
    if not isinstance(evs, list):
        raise _err(where, "expect.events must be a list of kinds or {kind: K, where: {...}} mappings.")
    parsed_events = []
    for i, e in enumerate(evs):
        if isinstance(e, str):
            e = {"kind": e}
        if not isinstance(e, Mapping) or "kind" not in e:
            raise _err(where, f"expect.events[{i}] must be a kind or {{kind: K, where: {{...}}}}.")
        _only(e, ("kind", "where"), f"{where}.events[{i}]")
        _event_kind(e["kind"], where, f"expect.events[{i}].kind")
        if not isinstance(e.get("where") or {}, Mapping):
            raise _err(where, f"expect.events[{i}].where must be a mapping of event fields to values.")
        parsed_events.append({"kind": e["kind"], "where": dict(e.get("where") or {})})
    restarts = raw.get("restarts")
    rmin = rmax = None
    if isinstance(restarts, Mapping):
        _only(restarts, ("min", "max"), f"{where}.restarts")
        rmin = _num(restarts, "min", None, where, integer=True)
        rmax = _num(restarts, "max", None, where, integer=True)
        if rmin is not None and rmax is not None and rmin > rmax:
            raise _err(where, f"expect.restarts has min={rmin} > max={rmax}, which no run can meet; "
                              "swap them, or give one number for an exact count.")
    elif restarts is not None:
        rmin = rmax = _num(raw, "restarts", None, where, integer=True)
    ws = raw.get("world_sizes")
    if ws is not None and (not isinstance(ws, list) or not all(isinstance(x, int) and x > 0 for x in ws)):
        raise _err(where, "expect.world_sizes must be a list of positive integers, e.g. [2, 1, 2].")
    rec = raw.get("recovery_s", "auto")
    if rec != "auto":
        rec = _num(raw, "recovery_s", None, where)
    gc = raw.get("generation_change")
    if gc is not None and not isinstance(gc, bool):
        raise _err(where, "expect.generation_change must be true or false.")
    return Expect(
        outcome=outcome, reactions=tuple(reactions), events=tuple(parsed_events), restarts_min=rmin,
        restarts_max=rmax, generation_change=gc,
        final_world_size=_num(raw, "final_world_size", None, where, minimum=1, integer=True),
        world_sizes=tuple(ws) if ws is not None else None,
        max_steps_recomputed=_num(raw, "max_steps_recomputed", None, where, integer=True),
        recovery_s=rec, exit_reason=raw.get("exit_reason"),
        committed_loss_allowed=bool(raw.get("committed_loss_allowed", False)),
    )


def parse(raw: Any, path: str = "<scenario>") -> Scenario:
    """Validate a parsed YAML document; raises ``ScenarioError`` naming the field and the fix."""
    # Imported here: faults imports scenario for its types.
    from resilient.chaos.faults import ACTIONS

    if not isinstance(raw, Mapping):
        raise _err(path, "a scenario is a YAML mapping (name, tier, topology, faults, expect...).")
    allowed = ("name", "description", "tier", "requires", "seed", "exactness", "topology", "training",
               "runtime", "faults", "expect", "deadline_s", "slack")
    _only(raw, allowed, path)
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise _err(path, f"name={name!r} must be lowercase letters, digits, '-' or '_' (<= 41 chars).")
    tier = raw.get("tier", "full")
    if tier not in TIERS:
        raise _err(path, f"tier={tier!r}; use one of {list(TIERS)}.")
    requires = raw.get("requires", []) or []
    if not isinstance(requires, list):
        raise _err(path, "requires must be a list, e.g. [root, netns, iptables].")
    for r in requires:
        if r not in KNOWN_REQUIREMENTS:
            raise _err(path, f"unknown requirement {r!r}; known: {list(KNOWN_REQUIREMENTS)}.")
    exactness = raw.get("exactness", "bitwise")
    rtol = atol = 0.0
    if isinstance(exactness, Mapping):
        _only(exactness, ("approx",), f"{path}.exactness")
        approx = exactness.get("approx") or {}
        rtol = _num(approx, "rtol", 1e-6, path)
        atol = _num(approx, "atol", 1e-8, path)
        exactness = "approx"
    elif exactness not in ("bitwise", "none"):
        raise _err(path, f"exactness={exactness!r}; use bitwise, none or {{approx: {{rtol, atol}}}}.")
    topology = _topology(raw.get("topology"), f"{path}.topology")
    training = _dataclass_from(Training, raw.get("training"), f"{path}.training", ("steps", "logical_shards",
                                                                                    "hidden"))
    if training.steps < 1:
        raise _err(path, "training.steps must be >= 1.")
    runtime = _dataclass_from(Runtime, raw.get("runtime"), f"{path}.runtime",
                              ("lease_ttl", "max_restarts", "replicas", "snapshot_every", "persist_every",
                               "persist_tmpfs_kb", "min_nodes"))
    if runtime.lease_ttl < 2:
        raise _err(path, f"runtime.lease_ttl={runtime.lease_ttl} must be >= 2 (etcd's minimum TTL).")
    if runtime.min_nodes > len(topology.hosts):
        raise _err(path, f"runtime.min_nodes={runtime.min_nodes} exceeds the {len(topology.hosts)} hosts.")
    faults_raw = raw.get("faults", []) or []
    if not isinstance(faults_raw, list):
        raise _err(path, "faults must be a list.")
    faults: list[Fault] = []
    host_names = {h.name for h in topology.hosts}
    for i, f in enumerate(faults_raw):
        fw = f"{path}.faults[{i}]"
        if not isinstance(f, Mapping):
            raise _err(fw, "each fault is a mapping {id, trigger, action, target, params, heal}.")
        _only(f, ("id", "trigger", "action", "target", "params", "heal"), fw)
        fid = f.get("id")
        if not isinstance(fid, str) or not _NAME.match(fid):
            raise _err(fw, f"id={fid!r} must be a short lowercase name.")
        action = f.get("action")
        if action not in ACTIONS:
            raise _err(fw, f"action={action!r} is unknown; use one of {sorted(ACTIONS)}.")
        driver = ACTIONS[action]
        target = _mapping(f, "target", fw)
        params = _mapping(f, "params", fw)
        trig = _trigger(f.get("trigger"), f"{fw}.trigger")
        _accepted(target, driver.accepts_target, "target", action, fw)
        # a {failpoint: NAME} trigger arms NAME as sleep(hold_ms) (runner.execute), whatever the action
        _accepted(params, driver.accepts_params + (("hold_ms",) if trig.kind == "failpoint" else ()), "params",
                  action, fw)
        if "hold_ms" in params:
            _num(params, "hold_ms", None, f"{fw}.params", integer=True)
        for label, host in (("target.host", target.get("host")), ("trigger.host", trig.host)):
            if host is not None and host not in host_names:
                raise _err(fw, f"{label}={host!r} is not a host of the topology {sorted(host_names)}.")
        if trig.kind == "failpoint" and trig.host is None and target.get("host") is None:
            raise _err(fw, f"a {{failpoint: {trig.value}}} trigger is armed in one host: give trigger.host "
                           "(or target.host).")
        if trig.kind == "step" and trig.value >= training.steps:
            raise _err(fw, f"trigger step={trig.value} can never fire: training.steps={training.steps}, so the last "
                           f"step is {training.steps - 1}. Use a step below {training.steps}, or raise "
                           "training.steps (with your own --script: to the number of steps it runs).")
        driver.validate(target, params, topology, fw)
        faults.append(Fault(id=fid, trigger=trig, action=action, target=target, params=params,
                            heal=_heal(f.get("heal"), f"{fw}.heal")))
    ids = [f.id for f in faults]
    if len(set(ids)) != len(ids):
        raise _err(path, f"fault ids must be unique, got {ids}.")
    for f in faults:
        if f.trigger.kind == "after" and f.trigger.value not in ids:
            raise _err(path, f"fault {f.id!r} triggers after {f.trigger.value!r}, which is not a fault id {ids}.")
        if f.trigger.kind == "after" and f.trigger.value == f.id:
            raise _err(path, f"fault {f.id!r} cannot trigger after itself.")
    deadline = raw.get("deadline_s")
    if deadline is not None and deadline != "auto":
        deadline = _num(raw, "deadline_s", None, path, minimum=1)
    else:
        deadline = None
    return Scenario(
        name=name, path=path, description=str(raw.get("description", "")).strip(), tier=tier,
        requires=tuple(requires), seed=_num(raw, "seed", 0, path, integer=True), exactness=exactness,
        rtol=rtol, atol=atol, topology=topology, training=training, runtime=runtime, faults=tuple(faults),
        expect=_expect(raw.get("expect"), f"{path}.expect"), deadline_s=deadline,
        slack=_num(raw, "slack", 2.0, path, minimum=1.0),
    )


def load(path: str | Path) -> Scenario:
    """Read and validate one scenario file."""
    p = Path(path)
    if p.is_dir():
        raise ScenarioError(f"{str(p)!r} is a directory, not a scenario file: name one file, or pass the "
                            f"directory to 'resilient-chaos check' or 'resilient-chaos suite', which read "
                            f"its *.yaml files.")
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"Cannot read scenario {str(p)!r}: {exc.strerror}.") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{p}: not valid YAML ({exc}).") from exc
    return parse(raw, str(p))

"""The scenario schema: every shipped scenario validates, and bad files fail with messages that name
the field and the fix."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import yaml

from resilient.chaos import scenario as scn
from resilient.chaos.event_kinds import KNOWN_EVENT_KINDS
from resilient.chaos.faults import ACTIONS

SCENARIOS = Path(__file__).resolve().parents[2] / "chaos" / "scenarios"

MINIMAL = {
    "name": "t", "tier": "ci",
    "topology": {"hosts": [{"name": "h0"}, {"name": "h1"}]},
    "faults": [{"id": "k", "trigger": {"step": 3}, "action": "kill_worker", "target": {"host": "h1"}}],
}


def _with(**changes):
    raw = yaml.safe_load(yaml.safe_dump(MINIMAL))
    raw.update(changes)
    return raw


def _fault(training=None, **fault):
    """MINIMAL with its one fault changed (``fault``: keys of the fault mapping)."""
    f = {"id": "k", "trigger": {"step": 3}, "action": "kill_worker", "target": {"host": "h1"}, **fault}
    return _with(faults=[f], **({"training": training} if training else {}))


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_scenario_validates(path: Path) -> None:
    s = scn.load(path)
    assert s.name and s.topology.hosts and s.faults


def test_ci_tier_covers_the_required_fault_families() -> None:
    ci = [scn.load(p) for p in SCENARIOS.glob("*.yaml")]
    actions = {f.action for s in ci if s.tier == "ci" for f in s.faults}
    assert {"kill_worker", "hang", "kill_agent", "host_loss", "etcd_kill", "partition", "corrupt_replica",
            "disk_full", "failpoint", "scale_up"} <= actions
    assert any(s.expect.outcome == "failure" for s in ci if s.tier == "ci")  # the restart budget


def test_minimal_scenario_gets_defaults() -> None:
    s = scn.parse(MINIMAL)
    assert s.topology.etcd_members == 1 and s.topology.network == "loopback"
    assert s.exactness == "bitwise" and s.expect.outcome == "success" and s.slack == 2.0
    assert s.faults[0].trigger.kind == "step" and s.faults[0].trigger.value == 3


@pytest.mark.parametrize("raw, needle", [
    (_with(tier="nightly"), "tier='nightly'"),
    (_with(bogus=1), "unknown field(s) ['bogus']"),
    (_with(topology={"hosts": [{"name": "H0"}]}), "lowercase letters"),
    (_with(topology={"hosts": [{"name": "h0"}, {"name": "h0"}]}), "must be unique"),
    (_with(topology={"etcd": {"members": 2}, "hosts": [{"name": "h0"}]}), "use 1 or 3"),
    (_with(faults=[{"id": "k", "trigger": {"step": 3}, "action": "explode", "target": {"host": "h1"}}]),
     "action='explode' is unknown"),
    (_with(faults=[{"id": "k", "trigger": {"step": 3, "time": 2}, "action": "kill_worker", "target": {"host": "h1"}}]),
     "exactly one of"),
    (_with(faults=[{"id": "k", "trigger": {"step": 3}, "action": "kill_worker", "target": {"host": "h9"}}]),
     "target.host='h9' is not a host"),
    (_with(faults=[{"id": "k", "trigger": {"after": "nope"}, "action": "kill_worker", "target": {"host": "h1"}}]),
     "which is not a fault id"),
    (_with(faults=[{"id": "k", "trigger": {"step": 3}, "action": "partition", "target": {"host": "h1"}}]),
     "needs topology.network: netns"),
    (_with(faults=[{"id": "k", "trigger": {"step": 3}, "action": "scale_up", "target": {"host": "h1"}}]),
     "start: deferred"),
    (_with(faults=[{"id": "k", "trigger": {"step": 3}, "action": "kill_worker", "target": {"host": "h1"},
                    "params": {"signal": "HUP"}}]), "params.signal='HUP'"),
    (_with(faults=[{"id": "k", "trigger": {"at": "start"}, "action": "failpoint", "target": {"host": "h1"},
                    "params": {"name": "x.y", "action": "explode"}}]), "unknown action"),
    (_with(runtime={"lease_ttl": 1}), "lease_ttl=1"),
    (_with(expect={"outcome": "maybe"}), "expect.outcome='maybe'"),
    (_with(requires=["gpu"]), "unknown requirement 'gpu'"),
    (_fault(params={"signal": "KILL", "sgnal": "TERM"}),
     "params ['sgnal'] unknown to action kill_worker: it reads only ['mode', 'repeat', 'signal']"),
    (_fault(action="kill_agent", params={"seconds": 3}), "params ['seconds'] unknown to action kill_agent: it takes no params"),
    (_fault(action="etcd_kill", target={"membr": "follower"}), "target ['membr'] unknown to action etcd_kill"),
    (_fault(params=["signal", "KILL"]), "params must be a mapping"),
    (_fault(params={"hold_ms": 50}), "params ['hold_ms'] unknown to action kill_worker"),  # no failpoint trigger
    (_fault(params={"mode": "exception", "signal": "TERM"}, target={"host": "h1", "local_rank": 0}),
     "params.signal applies only to mode: signal"),
    (_fault(params={"repeat": True}), "params.repeat applies only to the in-worker modes"),
    (_fault(action="hang", params={"seconds": 5}), "params.seconds applies only to the gil and sleep modes"),
    (_fault(action="slow_link", params={"blackhole": True, "delay_ms": 50}), "no effect with blackhole: true"),
    (_fault(action="disk_full", trigger={"failpoint": "persist.shard.after_write"}, target={}),
     "trigger is armed in one host: give trigger.host"),
    (_fault(trigger={"step": 40}), "trigger step=40 can never fire: training.steps=40"),
    (_fault(trigger={"step": 12}, training={"steps": 10}), "trigger step=12 can never fire: training.steps=10"),
    (_fault(trigger={"event": "no.such.event"}), "trigger.event='no.such.event' is not an event kind"),
    (_with(expect={"reactions": ["worker.exitt"]}), "expect.reactions[0]='worker.exitt' is not an event kind the "
                                                    "runtime or the harness emits, so it would never be seen. Did you "
                                                    "mean 'worker.exit'?"),
    (_with(expect={"events": [{"kind": "restore.don"}]}), "expect.events[0].kind='restore.don'"),
    (_with(expect={"restarts": {"min": 3, "max": 1}}), "expect.restarts has min=3 > max=1"),
])
def test_bad_scenarios_are_refused_with_the_field_named(raw, needle: str) -> None:
    with pytest.raises(scn.ScenarioError) as info:
        scn.parse(raw, "x.yaml")
    assert needle in str(info.value)
    assert str(info.value).startswith("x.yaml")


def test_unreadable_and_invalid_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(scn.ScenarioError, match="Cannot read scenario"):
        scn.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(scn.ScenarioError, match="not valid YAML"):
        scn.load(bad)


def test_what_the_checks_refuse_is_accepted_at_the_edge() -> None:
    """The refusals above are exact: the last step, min == max, hold_ms under a failpoint trigger and each
    action's own params load."""
    assert scn.parse(_fault(trigger={"step": 39})).faults[0].trigger.value == 39
    assert scn.parse(_fault(trigger={"step": 9}, training={"steps": 10})).training.steps == 10
    s = scn.parse(_with(expect={"restarts": {"min": 2, "max": 2}, "reactions": ["worker.exit", "fault.healed"],
                                "events": [{"kind": "restore.done", "where": {"origin": "peer:*"}}]}))
    assert (s.expect.restarts_min, s.expect.restarts_max) == (2, 2)
    held = scn.parse(_fault(trigger={"failpoint": "persist.shard.after_write"}, params={"hold_ms": 500}))
    assert held.faults[0].params == {"hold_ms": 500}
    hung = scn.parse(_fault(action="hang", params={"mode": "sleep", "seconds": 600},
                            target={"host": "h1", "local_rank": 0}))
    assert hung.faults[0].params["seconds"] == 600


# --- the lists the checks rely on cannot go stale -------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
_EMIT = re.compile(r"""\b_?emit\(\s*["']([^"']+)["']""")  # events.emit, clog.emit, the persister's self._emit


def _emitted_kinds() -> dict[str, str]:
    """kind -> first file that emits it with a literal: ``events.emit``, the harness's ``clog.emit``, the
    persister's ``self._emit``."""
    kinds: dict[str, str] = {}
    for path in sorted((ROOT / "resilient").rglob("*.py")):
        if path.name == "event_kinds.py":
            continue
        for kind in _EMIT.findall(path.read_text(encoding="utf-8")):
            kinds.setdefault(kind, str(path.relative_to(ROOT)))
    return kinds


def test_the_emit_scan_finds_the_runtime_and_harness_kinds() -> None:
    kinds = _emitted_kinds()
    assert {"step.done", "restore.done", "persist.commit", "chaos.run.start", "fault.fired"} <= set(kinds)


@pytest.mark.parametrize("kind,where", sorted(_emitted_kinds().items()))
def test_every_emitted_event_kind_is_known_to_the_scenario_checks(kind: str, where: str) -> None:
    assert kind in KNOWN_EVENT_KINDS, f"{kind!r} (emitted in {where}) is missing from resilient/chaos/event_kinds.py"


# Kinds emitted through a variable, which the _EMIT scan cannot see: resilient/chaos/runner.py passes them as
# literals to its _wrap(f, fn, kind), whose run() writes them with clog.emit(kind, ...). Only these two.
_EMITTED_INDIRECTLY = {
    "fault.step": "resilient/chaos/runner.py",  # fired(): _wrap(f, fn, "fault.step") for each followup
    "fault.healed": "resilient/chaos/runner.py",  # fired(): _wrap(f, lambda: ...heal(...), "fault.healed")
}


def _emitted_indirectly(kind: str) -> bool:
    """``kind`` is still passed to the runner's ``_wrap`` and ``_wrap`` still emits what it is given."""
    source = (ROOT / _EMITTED_INDIRECTLY[kind]).read_text(encoding="utf-8")
    wrapped = re.compile(r"""\b_wrap\([^"']*["']""" + re.escape(kind) + r"""["']""")
    return bool(wrapped.search(source)) and "clog.emit(kind," in source


def test_the_indirect_allowance_holds_only_kinds_the_emit_scan_cannot_see() -> None:
    assert set(_EMITTED_INDIRECTLY) <= KNOWN_EVENT_KINDS
    assert not set(_EMITTED_INDIRECTLY) & set(_emitted_kinds()), "emitted with a literal now: drop from the allowance"


@pytest.mark.parametrize("kind", sorted(KNOWN_EVENT_KINDS))
def test_every_known_event_kind_is_still_written_somewhere(kind: str) -> None:
    """Each known kind is emitted with a literal (the _EMIT scan) or is one of the runner's indirect kinds and
    is still passed to its emitter; a kind that only code reading events mentions does not count."""
    written = kind in _emitted_kinds() or (kind in _EMITTED_INDIRECTLY and _emitted_indirectly(kind))
    assert written, f"{kind!r} is in KNOWN_EVENT_KINDS but no module under resilient/ writes it any more"


@pytest.mark.parametrize("name", sorted(ACTIONS))
def test_each_action_declares_exactly_the_params_it_reads(name: str) -> None:
    driver = type(ACTIONS[name])
    src = inspect.getsource(driver)
    read = set(re.findall(r"""params(?:\.get\(|\[)\s*["'](\w+)["']""", src))
    read |= set(re.findall(r"""param_(?:number|choice)\(\s*(?:fault\.)?params,\s*["'](\w+)["']""", src))
    assert read == set(driver.accepts_params)
    targets = set(re.findall(r"""target(?:\.get\(|\[)\s*["'](\w+)["']""", src))
    if "need_host(" in src:
        targets.add("host")
    if "_pick_worker(" in src:
        targets |= {"host", "rank"}
    assert targets <= set(driver.accepts_target)
    for kind in driver.reactions:
        assert kind in KNOWN_EVENT_KINDS


def test_the_example_scenario_in_the_docs_validates() -> None:
    text = (ROOT / "docs" / "chaos.md").read_text(encoding="utf-8")
    (block,) = re.findall(r"```yaml\n(.*?)```", text, re.S)
    s = scn.parse(yaml.safe_load(block), "docs/chaos.md")
    assert s.faults[0].trigger.value < s.training.steps

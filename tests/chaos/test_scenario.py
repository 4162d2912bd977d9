"""The scenario schema: every shipped scenario validates, and bad files fail with messages that name
the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from resilient.chaos import scenario as scn

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

"""resilient.failpoints: spec parsing, each action, counts, and arming from the environment."""

from __future__ import annotations

import errno
import json

import pytest

from resilient import events, failpoints
from resilient.errors import ConfigError, FailpointError

from persist_helpers import run_python


def test_unarmed_hit_does_nothing(tmp_path):
    log = str(tmp_path / "events.jsonl")
    events.open_log(log)
    try:
        reg = failpoints.Registry("other=2*raise")
        reg.hit("anything")  # neither raises nor fires nor touches the armed term
        assert reg.armed() == {"other": "2*raise"}
        assert [e for e in events.read(log) if e["kind"] == "failpoint.fired"] == []
        with pytest.raises(FailpointError):
            reg.hit("other")  # the log records firings: the armed name does
        assert [e["name"] for e in events.read(log) if e["kind"] == "failpoint.fired"] == ["other"]
    finally:
        events.open_log(None)


def test_parse_spec_accepts_commas_semicolons_counts_and_sleep():
    armed = failpoints.parse_spec("a=panic, b=2*raise;c=sleep(5),d=enospc")
    assert {k: v.spec() for k, v in armed.items()} == {"a": "panic", "b": "2*raise", "c": "sleep(5)", "d": "enospc"}


def test_off_disarms_an_earlier_term():
    assert failpoints.parse_spec("a=panic,a=off") == {}


@pytest.mark.parametrize("spec", ["a", "=panic", "a=explode", "a=sleep", "a=sleep(x)", "a=panic(3)", "a=sleep(-1)"])
def test_bad_specs_are_refused_with_a_config_error(spec):
    with pytest.raises(ConfigError):
        failpoints.parse_spec(spec)


def test_raise_action_raises_failpoint_error():
    reg = failpoints.Registry("x=raise")
    with pytest.raises(FailpointError, match="'x'"):
        reg.hit("x")
    reg.hit("y")  # other names are unaffected


def test_enospc_action_raises_oserror_with_enospc():
    reg = failpoints.Registry("x=enospc")
    with pytest.raises(OSError) as info:
        reg.hit("x")
    assert info.value.errno == errno.ENOSPC


def test_count_limits_how_often_a_term_fires():
    reg = failpoints.Registry("x=2*raise")
    for _ in range(2):
        with pytest.raises(FailpointError):
            reg.hit("x")
    reg.hit("x")
    assert reg.armed() == {}


def test_sleep_action_continues_after_sleeping(monkeypatch):
    slept = []
    monkeypatch.setattr(failpoints.time, "sleep", slept.append)
    reg = failpoints.Registry("x=1*sleep(250)")
    reg.hit("x")  # returns (no raise) after sleeping the milliseconds given, once
    reg.hit("x")
    assert slept == [0.25]
    assert reg.armed() == {}


def test_arm_and_disarm_at_run_time():
    reg = failpoints.Registry()
    reg.arm("x", "raise")
    assert reg.armed() == {"x": "raise"}
    reg.disarm("x")
    reg.hit("x")
    reg.arm("x", "raise")
    reg.disarm()
    reg.hit("x")


def test_resolve_accepts_registry_spec_or_none():
    reg = failpoints.Registry()
    assert failpoints.resolve(reg) is reg
    assert failpoints.resolve(None) is failpoints.default()
    assert failpoints.resolve("x=raise").armed() == {"x": "raise"}
    with pytest.raises(ConfigError):
        failpoints.resolve(42)


def test_env_armed_panic_exits_137_and_emits_fired_event(tmp_path):
    log = tmp_path / "events.jsonl"
    proc = run_python(
        """
        from resilient import events, failpoints
        failpoints.hit("before")
        print("reached", flush=True)
        failpoints.hit("demo.point", step=7)
        print("not reached", flush=True)
        """,
        env={"RESILIENT_FAILPOINTS": "demo.point=panic", "RESILIENT_EVENT_LOG": str(log)},
    )
    assert proc.returncode == failpoints.PANIC_EXIT_CODE, proc.stderr
    assert "reached" in proc.stdout and "not reached" not in proc.stdout
    fired = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["kind"], e["name"], e["action"], e["step"]) for e in fired] == [
        ("failpoint.fired", "demo.point", "panic", 7)
    ]

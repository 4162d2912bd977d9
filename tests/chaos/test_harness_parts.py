"""Harness parts with real resources: the TCP proxy (real sockets), in-worker hook parsing and one-shot
markers, calibration bounds, report and suite verdicts, preflight on a missing launcher flag."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from resilient import env
from resilient.chaos import calibrate, inworker, report, scenario as scn
from resilient.chaos.proxy import TcpProxy
from resilient.errors import ConfigError


def _echo_server():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            def echo(c=c):
                while (data := c.recv(4096)):
                    c.sendall(data)
            threading.Thread(target=echo, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv


def _deadline_recv(sock: socket.socket, n: int, timeout: float) -> bytes:
    sock.settimeout(timeout)
    try:
        return sock.recv(n)
    except socket.timeout:
        return b""


def test_proxy_forwards_then_blackholes_silently_then_resumes() -> None:
    srv = _echo_server()
    proxy = TcpProxy(("127.0.0.1", 0), srv.getsockname())
    try:
        c = socket.create_connection(proxy.address)
        c.sendall(b"ping")
        assert _deadline_recv(c, 4, 5.0) == b"ping"
        proxy.blackhole(True)
        c.sendall(b"lost?")
        assert _deadline_recv(c, 5, 0.5) == b""  # silence, and the connection is not reset
        proxy.blackhole(False)
        assert _deadline_recv(c, 5, 5.0) == b"lost?"  # buffered bytes flow again
        proxy.set_delay(300)
        t = time.monotonic()
        c.sendall(b"slow")
        assert _deadline_recv(c, 4, 5.0) == b"slow"
        assert time.monotonic() - t >= 0.3
        c.close()
    finally:
        proxy.close()
        srv.close()


def test_inworker_terms_parse_and_refuse_bad_ones() -> None:
    (t,) = inworker.parse("k1:gil(5):15:0")
    assert (t.id, t.action, t.arg, t.step, t.local_rank, t.repeat) == ("k1", "gil", 5.0, 15, 0, False)
    assert inworker.parse(t.spec()) == [t]
    assert inworker.parse("a:raise:3:1:repeat")[0].repeat
    (s,) = inworker.parse("s1:sleep(600):15:0")
    assert (s.action, s.arg) == ("sleep", 600.0) and inworker.parse(s.spec()) == [s]
    for bad in ("x:boom:1:0", "x:segv:one:0", "x:segv:1", "x:segv:1:0:sometimes"):
        with pytest.raises(ConfigError):
            inworker.parse(bad)


def test_inworker_one_shot_term_fires_once_per_job(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(env.CHAOS_DIR, str(tmp_path))
    term = inworker.Term("once", "raise", None, 3, 0)
    assert inworker._claim(term) is True
    assert inworker._claim(term) is False  # a respawned worker does not fire it again
    assert inworker._claim(inworker.Term("again", "raise", None, 3, 0, repeat=True)) is True


def test_inworker_raise_goes_through_the_failpoint_registry(tmp_path: Path, monkeypatch) -> None:
    from resilient.errors import FailpointError

    monkeypatch.setenv(env.CHAOS_DIR, str(tmp_path))
    monkeypatch.setenv(env.CHAOS_INWORKER, "boom:raise:4:0")
    monkeypatch.setattr(inworker, "_terms", None)
    inworker.at_step(3, 0)
    inworker.at_step(4, 1)
    with pytest.raises(FailpointError, match="chaos.worker.boom"):
        inworker.at_step(4, 0)
    inworker.at_step(4, 0)  # one-shot: already fired


def _sc(**kw):
    raw = {"name": "t", "topology": {"hosts": [{"name": "h0"}, {"name": "h1"}]},
           "faults": [{"id": "h", "trigger": {"step": 3}, "action": "hang", "target": {"host": "h1"}}]}
    raw.update(kw)
    return scn.parse(raw)


def test_bounds_derive_from_calibration_and_the_faults_detection_budget() -> None:
    cal = calibrate.Calibration(key="k", state_hash="h", final_loss=0.1, startup_s=4.0, step_s=0.05, total_s=10.0,
                                train_s=5.0, run_dir="/x")
    sc = _sc(runtime={"hang_timeout": 3})
    assert calibrate.recovery_bound(sc, cal) == pytest.approx(2.0 * (3.0 + 4.0 + 0.5 + 1.0))
    slower = calibrate.Calibration(**{**cal.to_json(), "startup_s": 8.0})
    assert calibrate.recovery_bound(sc, slower) > calibrate.recovery_bound(sc, cal)
    assert calibrate.deadline(sc, cal) > cal.total_s
    assert calibrate.deadline(_sc(deadline_s=42), cal) == 42
    # a worker asleep with the GIL released is caught by the sooner of the hang and leave timeouts
    asleep = [{"id": "h", "trigger": {"step": 3}, "action": "hang", "target": {"host": "h1", "local_rank": 0},
               "params": {"mode": "sleep"}}]
    sc = _sc(runtime={"hang_timeout": 120, "leave_timeout": 3}, faults=asleep)
    assert calibrate.recovery_bound(sc, cal) == pytest.approx(2.0 * (3.0 + 4.0 + 0.5 + 1.0))


def test_the_sleep_and_gil_modes_of_a_hang_need_the_worker_named() -> None:
    for mode in ("sleep", "gil"):
        with pytest.raises(scn.ScenarioError, match=f"the {mode} mode needs target.local_rank"):
            _sc(faults=[{"id": "h", "trigger": {"step": 3}, "action": "hang", "target": {"host": "h1"},
                         "params": {"mode": mode}}])


def test_the_runtime_timeouts_are_raised_to_what_the_machine_needs() -> None:
    cal = calibrate.Calibration(key="k", state_hash="h", final_loss=0.1, startup_s=4.0, step_s=0.05, total_s=10.0,
                                train_s=5.0, run_dir="/x", max_step_gap_s=2.0)
    adapted, notes = calibrate.adapt_runtime(_sc(runtime={"hang_timeout": 3, "leave_timeout": 3}), cal)
    assert adapted.runtime.hang_timeout >= 8 and adapted.runtime.leave_timeout >= 8
    assert any(n.startswith("leave_timeout 3s ->") for n in notes)


def test_suite_verdict_fails_when_everything_skipped_or_anything_failed() -> None:
    p, f, s = {"verdict": "pass"}, {"verdict": "fail"}, {"verdict": "skip"}
    assert report.suite_verdict([p, s]) == "pass"
    assert report.suite_verdict([s, s]) == "fail"
    assert report.suite_verdict([p, f]) == "fail"
    assert report.suite_verdict([]) == "fail"


def test_skip_report_names_the_reason_and_repro(tmp_path: Path) -> None:
    rep = report.skipped(_sc(), 7, tmp_path, ["iptables: not installed"], "resilient-chaos run t.yaml --seed 7")
    report.write(rep, tmp_path, None, None)
    md = (tmp_path / "report.md").read_text()
    assert "SKIP" in md and "iptables: not installed" in md and "--seed 7" in md
    table = report.summary_markdown([rep], "fail", 1.0)
    assert "| t | skip |" in table and "**fail**" in table


def test_preflight_skips_when_the_launcher_lacks_a_flag(monkeypatch, tmp_path: Path) -> None:
    from resilient.chaos import preflight

    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    monkeypatch.setattr(preflight, "launcher_help", lambda: "--nnodes only")
    reasons = preflight.check(_sc(), script)
    assert reasons and "lacks the flag(s)" in reasons[0]
    assert preflight.check(_sc(), tmp_path / "missing.py")[0].endswith("does not exist")


def test_preflight_skips_failpoints_the_runtime_does_not_define() -> None:
    from resilient.chaos import preflight

    assert preflight.failpoint_defined("persist.shard.after_write")
    assert not preflight.failpoint_defined("no.such.failpoint.anywhere")

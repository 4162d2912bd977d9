"""One real scenario end to end: a 2-host job under resilient-run, a worker SIGKILLed mid-run.

Asserts what the harness itself owns: the fault fired and the runtime visibly reacted, the report,
timeline and reproduce command were written, and teardown left no process, namespace or shm directory
behind. Whether the runtime's recovery is bitwise exact is the acceptance suite's verdict
(``resilient-chaos suite chaos/scenarios --tier ci``), recorded in the report, not asserted here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import psutil
import pytest

from resilient.chaos import preflight, scenario as scn
from resilient.chaos.runner import run_scenario

SCENARIO = Path(__file__).resolve().parents[2] / "chaos" / "scenarios" / "worker_sigkill.yaml"


@pytest.mark.slow
def test_worker_sigkill_scenario_runs_and_reports_honestly(tmp_path: Path, monkeypatch) -> None:
    if preflight.launcher_help() is None:
        pytest.skip("resilient-run is not available")
    s = scn.load(SCENARIO)
    # A generous hang timeout: this test is about the harness, and a loaded CI box must not fake hangs.
    s = dataclasses.replace(s, training=dataclasses.replace(s.training, steps=24, step_sleep_ms=40),
                            runtime=dataclasses.replace(s.runtime, hang_timeout=15.0),
                            faults=(dataclasses.replace(s.faults[0], trigger=dataclasses.replace(s.faults[0].trigger,
                                                                                                  value=8)),))
    before = {p.pid for p in psutil.process_iter()}
    monkeypatch.chdir(tmp_path)  # a relative --out, as `resilient-chaos run x.yaml` defaults to: the agents run
    rep = run_scenario(s, script=None, seed=7, out=Path("results"),  # in directories of their own
                       repro="resilient-chaos run worker_sigkill.yaml")
    run_dir = Path(rep["artifacts"])
    assert rep["verdict"] in ("pass", "fail"), rep.get("reason")
    assert "baseline" not in rep["checks"], rep["reason"]
    assert rep["checks"]["fault_fired"]["status"] == "pass"
    assert rep["checks"]["reaction"]["status"] == "pass", rep["checks"]["reaction"]
    assert rep["checks"]["no_leftovers"]["status"] == "pass", rep["checks"]["no_leftovers"]
    assert "teardown" not in rep["checks"] and "harness" not in rep["checks"], rep["reason"]
    assert rep["calibration"]["state_hash"] and rep["metrics"]["detection_s"] is not None
    assert json.loads((run_dir / "report.json").read_text())["verdict"] == rep["verdict"]
    assert "Reproduce: `resilient-chaos run" in (run_dir / "report.md").read_text()
    assert (run_dir / "timeline.png").stat().st_size > 0
    assert not list(Path("/dev/shm").glob("rs-chaos-chaos-worker-sigkill-*"))
    ours = [p for p in psutil.process_iter(["cmdline"]) if p.pid not in before
            and any(str(tmp_path) in part for part in (p.info["cmdline"] or []))]
    assert ours == []

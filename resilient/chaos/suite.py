"""Runs every scenario of a directory for one tier, serially, and writes the summary table.

``--tier ci`` runs the scenarios marked ``tier: ci``; ``--tier full`` runs all of them. The suite fails
when any scenario fails, and also when every scenario was skipped (a suite that proved nothing).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from resilient.chaos import report, scenario as scn
from resilient.chaos.progress import Progress
from resilient.chaos.runner import run_scenario


def select(directory: Path, tier: str) -> list[scn.Scenario]:
    out = []
    for path in sorted(directory.glob("*.yaml")):
        s = scn.load(path)
        if tier == "full" or s.tier == tier:
            out.append(s)
    return out


def run_suite(directory: Path, tier: str, out: Path, *, script: Path | None = None,
              only: list[str] | None = None) -> tuple[str, list[dict[str, Any]]]:
    t0 = time.monotonic()
    scenarios = select(directory, tier)
    if only:
        scenarios = [s for s in scenarios if s.name in only]
    progress = Progress()
    reports = []
    calibrated: dict[str, str] = {}  # key -> '' or the failure of this suite run's baseline for it
    for s in scenarios:
        repro = f"resilient-chaos run {s.path} --seed {s.seed} --out {out}" + (f" --script {script}" if script else "")
        rep = run_scenario(s, script=script, seed=None, out=out, progress=progress, repro=repro,
                           fresh_baselines=calibrated)
        progress.done(f"{s.name}: {rep['verdict'].upper()}" + (f" ({rep['reason'][:200]})" if rep.get("reason") else ""))
        reports.append(rep)
    verdict = report.suite_verdict(reports)
    wall = time.monotonic() - t0
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.md").write_text(report.summary_markdown(reports, verdict, wall) + "\n")
    (out / "suite.json").write_text(json.dumps({"tier": tier, "verdict": verdict, "wall_s": round(wall, 1),
                                                "scenarios": reports}, indent=1, default=str))
    return verdict, reports

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


def scenario_files(directory: Path) -> list[Path]:
    """The ``*.yaml`` files of a scenario directory, sorted. A missing directory, a file, or a directory
    without any ``*.yaml`` is a ``ScenarioError`` (a suite of nothing proves nothing)."""
    if not directory.exists():
        raise scn.ScenarioError(f"Scenario directory {str(directory)!r} does not exist; pass the directory that "
                                f"holds the *.yaml scenario files (the project's are in chaos/scenarios).")
    if not directory.is_dir():
        raise scn.ScenarioError(f"{str(directory)!r} is a file, not a directory of scenarios; run one scenario "
                                f"with 'resilient-chaos run {directory}'.")
    files = sorted(p for p in directory.glob("*.yaml") if p.is_file())
    if not files:
        raise scn.ScenarioError(f"Scenario directory {str(directory)!r} holds no *.yaml file; pass the directory "
                                f"that holds the scenario files (the project's are in chaos/scenarios).")
    return files


def select(directory: Path, tier: str, only: list[str] | None = None) -> list[scn.Scenario]:
    """The scenarios of ``directory`` a suite of ``tier`` runs (``only``: just these names). Raises
    ``ScenarioError`` when a file is invalid, two files share a name (their results would mix), a name of
    ``only`` is not in the tier, or nothing is left to run."""
    loaded = [scn.load(path) for path in scenario_files(directory)]
    by_name: dict[str, scn.Scenario] = {}
    for s in loaded:
        if s.name in by_name:
            raise scn.ScenarioError(f"{s.path} and {by_name[s.name].path} both name their scenario {s.name!r}; "
                                    f"results are filed by name, so give each file its own.")
        by_name[s.name] = s
    out = [s for s in loaded if tier == "full" or s.tier == tier]
    if only:
        in_tier = {s.name for s in out}
        missing = [n for n in only if n not in in_tier]
        if missing:
            elsewhere = [n for n in missing if n in by_name]
            hint = (f" ({', '.join(elsewhere)} {'is' if len(elsewhere) == 1 else 'are'} tier full: add --tier full)"
                    if elsewhere else "")
            raise scn.ScenarioError(f"--only {' '.join(missing)}: no such scenario in tier {tier} of "
                                    f"{directory}{hint}; the tier's scenarios are {sorted(in_tier)}.")
        out = [s for s in out if s.name in only]
    if not out:
        raise scn.ScenarioError(f"{directory} holds no scenario of tier {tier} (its {len(loaded)} file(s) are all "
                                f"tier full); run them with --tier full.")
    return out


def run_suite(directory: Path, tier: str, out: Path, *, script: Path | None = None,
              only: list[str] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """Run the selected scenarios and write ``out/suite.md`` and ``suite.json``. A bad selection (see
    ``select``) raises ``ScenarioError`` before anything runs or is written."""
    t0 = time.monotonic()
    scenarios = select(directory, tier, only)
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

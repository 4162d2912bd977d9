"""Reports: ``report.json`` and ``report.md`` per scenario, a PNG timeline, and the suite summary table.

The verdict is ``pass`` only when every check passed (``n/a`` checks say why they did not apply),
``fail`` when any check failed, and ``skip`` only for a scenario whose requirements were missing at
preflight (with the reasons). Every report carries the one-line command that reproduces it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resilient.chaos import invariants as inv
from resilient.chaos import metrics as M
from resilient.chaos.scenario import Scenario

if TYPE_CHECKING:
    from resilient.chaos.calibrate import Calibration
    from resilient.chaos.runner import Execution


def _base(scenario: Scenario, seed: int, run_dir: Path, repro: str) -> dict[str, Any]:
    return {"scenario": scenario.name, "path": scenario.path, "tier": scenario.tier, "seed": seed,
            "description": scenario.description, "artifacts": str(run_dir), "repro": repro}


def skipped(scenario: Scenario, seed: int, run_dir: Path, reasons: list[str], repro: str) -> dict[str, Any]:
    rep = _base(scenario, seed, run_dir, repro)
    rep.update(verdict="skip", reason="; ".join(reasons), checks={}, metrics={})
    return rep


def failed_setup(scenario: Scenario, seed: int, run_dir: Path, reason: str, repro: str) -> dict[str, Any]:
    rep = _base(scenario, seed, run_dir, repro)
    rep.update(verdict="fail", reason=reason, checks={"baseline": {"status": "fail", "detail": reason}}, metrics={})
    return rep


def build(scenario: Scenario, seed: int, run_dir: Path, ex: "Execution", checks: list[inv.Check],
          m: M.RunMetrics, cal: "Calibration | None", repro: str, wall_s: float) -> dict[str, Any]:
    rep = _base(scenario, seed, run_dir, repro)
    verdict = inv.verdict(checks)
    failed = [c for c in checks if c.status == inv.FAIL]
    fault_evs = {str(e.get("id")): e for e in M.fault_events(ex.events)}
    healed = {str(e.get("id")): e for e in ex.events if e.get("kind") == "fault.healed"}
    rep.update(
        verdict=verdict,
        reason="; ".join(f"{c.name}: {c.detail}" for c in failed),
        faults=[{"id": f.id, "action": f.action, "target": dict(f.target), "fired": f.id in fault_evs,
                 "t": round(M.fault_time(fault_evs[f.id]) - ex.t_start, 3) if f.id in fault_evs else None,
                 "healed_t": round(float(healed[f.id]["mono"]) - ex.t_start, 3) if f.id in healed else None,
                 "evidence": {k: v for k, v in fault_evs.get(f.id, {}).items()
                              if k not in ("ts", "mono", "kind", "node", "pid", "_src")}}
                for f in scenario.faults],
        metrics=m.as_dict(),
        exactness={"mode": scenario.exactness, "final_hash": m.final_hashes[0] if m.final_hashes else None,
                   "baseline_hash": cal.state_hash if cal else None,
                   "equal": bool(cal and m.final_hashes and set(m.final_hashes) == {cal.state_hash})},
        calibration=cal.to_json() if cal else None,
        checks={c.name: c.as_dict() for c in checks},
        exit_codes=ex.exit_codes,
        wall_s=round(wall_s, 2),
    )
    return rep


def write(rep: dict[str, Any], run_dir: Path, ex: "Execution | None", m: M.RunMetrics | None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    if ex is not None and m is not None:
        try:
            timeline_png(run_dir / "timeline.png", ex, m, rep.get("scenario", ""))
            rep["timeline_png"] = str(run_dir / "timeline.png")
        except (ImportError, OSError, ValueError) as exc:
            rep["timeline_png"] = f"not drawn: {exc}"
    (run_dir / "report.json").write_text(json.dumps(rep, indent=1, default=str))
    (run_dir / "report.md").write_text(markdown(rep))


def markdown(rep: dict[str, Any]) -> str:
    lines = [f"# {rep['scenario']}: **{rep['verdict'].upper()}**", ""]
    if rep.get("description"):
        lines += [rep["description"], ""]
    if rep.get("reason"):
        lines += [f"Reason: {rep['reason']}", ""]
    lines += [f"Reproduce: `{rep.get('repro', '')}`", ""]
    for note in rep.get("runtime_adapted") or []:
        lines += [f"Runtime adapted to the machine: {note}.", ""]
    met = rep.get("metrics") or {}
    if met:
        lines += ["| metric | value |", "|---|---|"]
        for k in ("detection_s", "recovery_s", "steps_recomputed", "restarts", "worker_starts", "generations",
                  "world_sizes", "train_s", "goodput"):
            lines.append(f"| {k} | {met.get(k)} |")
        lines.append("")
    if rep.get("faults"):
        lines += ["| fault | action | fired | t (s) | healed (s) |", "|---|---|---|---|---|"]
        for f in rep["faults"]:
            lines.append(f"| {f['id']} | {f['action']} | {f['fired']} | {f['t']} | {f['healed_t']} |")
        lines.append("")
    if rep.get("checks"):
        lines += ["| check | status | evidence |", "|---|---|---|"]
        for name, c in rep["checks"].items():
            lines.append(f"| {name} | {c['status']} | {c['detail'].replace('|', '/')} |")
        lines.append("")
    if rep.get("timeline_png", "").endswith(".png"):
        lines += ["![timeline](timeline.png)", ""]
    return "\n".join(lines)


def timeline_png(path: Path, ex: "Execution", m: M.RunMetrics, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = M.step_events(ex.events)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    by_rank: dict[Any, list[tuple[float, int]]] = {}
    for ev in steps:
        by_rank.setdefault((ev.get("_src"), ev.get("rank")), []).append((float(ev["mono"]) - ex.t_start, ev["step"]))
    for (src, rank), pts in sorted(by_rank.items(), key=lambda x: str(x[0])):
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], ".", ms=3, label=f"{src} rank {rank}")
    ax1.set_ylabel("step")
    tl = [(t - ex.t_start, ws) for t, _, ws in m.timeline]
    if tl:
        end = max(ex.wall_s, tl[-1][0])
        xs = [t for t, _ in tl] + [end]
        ys = [ws for _, ws in tl] + [tl[-1][1]]
        ax2.step(xs, ys, where="post")
    ax2.set_ylabel("world size")
    ax2.set_xlabel("seconds since start")
    for f in m.faults:
        t = f.t - ex.t_start
        for ax in (ax1, ax2):
            ax.axvline(t, color="red", lw=1)
            if f.recovery_s is not None:
                ax.axvspan(t, t + f.recovery_s, color="red", alpha=0.1)
        ax1.annotate(f.id, (t, 0), color="red", fontsize=8, rotation=90, va="bottom")
    for ev in ex.events:
        if ev.get("kind") == "fault.healed":
            for ax in (ax1, ax2):
                ax.axvline(float(ev["mono"]) - ex.t_start, color="green", lw=1, ls="--")
    if by_rank:
        ax1.legend(fontsize=7, loc="lower right")
    ax1.set_title(f"{title}: steps, world size, faults (red), recovery (shaded), heals (green)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


SUMMARY_COLUMNS = ("scenario", "verdict", "fault(s)", "detect s", "recover s", "recomputed", "restarts",
                   "world sizes", "bitwise", "wall s", "note")


def summary_rows(reports: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in reports:
        met = r.get("metrics") or {}
        ex = r.get("exactness") or {}
        note = r.get("reason", "")[:90] if r["verdict"] != "pass" else ""
        rows.append([
            r["scenario"], r["verdict"], ",".join(f["action"] for f in r.get("faults", [])) or "-",
            _fmt(met.get("detection_s")), _fmt(met.get("recovery_s")), _fmt(met.get("steps_recomputed")),
            _fmt(met.get("restarts")), "→".join(map(str, met.get("world_sizes") or [])) or "-",
            ("yes" if ex.get("equal") else "no") if ex.get("mode") == "bitwise" and r["verdict"] != "skip"
            and (r.get("checks") or {}).get("final_state", {}).get("status") != "n/a" else "-",
            _fmt(r.get("wall_s")), note.replace("|", "/"),
        ])
    return rows


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.2f}"
    return str(x)


def summary_markdown(reports: list[dict[str, Any]], verdict: str, wall_s: float) -> str:
    lines = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    for row in summary_rows(reports):
        lines.append("| " + " | ".join(row) + " |")
    counts = {v: sum(1 for r in reports if r["verdict"] == v) for v in ("pass", "fail", "skip")}
    lines += ["", f"Suite verdict: **{verdict}** ({counts['pass']} passed, {counts['fail']} failed, "
                  f"{counts['skip']} skipped) in {wall_s:.0f}s."]
    return "\n".join(lines)


def suite_verdict(reports: list[dict[str, Any]]) -> str:
    if not reports:
        return "fail"
    if any(r["verdict"] == "fail" for r in reports):
        return "fail"
    if all(r["verdict"] == "skip" for r in reports):
        return "fail"
    return "pass"

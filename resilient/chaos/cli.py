"""``resilient-chaos``: run one scenario or a suite of them against a real job and report what survived.

    resilient-chaos run SCENARIO.yaml [--script train.py] [--seed N] [--out DIR]
    resilient-chaos suite DIR --tier ci|full [--out DIR] [--only NAME ...]
    resilient-chaos check SCENARIO.yaml|DIR...  (validate files only; a DIR: its *.yaml files)

Exit status: 0 when the verdict is pass, 1 on fail, 2 on skip (run) or a bad scenario file, a scenario
directory that is missing or holds no *.yaml file, or a suite selection with nothing to run (nothing is
written then). ``check`` validates every file it is given and reports each error; 2 if any failed.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path

from resilient import logs
from resilient.chaos import report, scenario as scn
from resilient.chaos.progress import Progress
from resilient.chaos.runner import run_scenario
from resilient.chaos.suite import run_suite, scenario_files
from resilient.errors import ChaosError

DEFAULT_OUT = "chaos-results"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resilient-chaos", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run one scenario")
    r.add_argument("scenario", type=Path, help="scenario YAML file")
    r.add_argument("--script", type=Path, default=None,
                   help="training script to break (default: chaos/train_chaos.py, deterministic)")
    r.add_argument("--seed", type=int, default=None, help="override the scenario's seed")
    r.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help="results directory")
    s = sub.add_parser("suite", help="run every scenario of a tier")
    s.add_argument("directory", type=Path, help="directory of scenario YAML files")
    s.add_argument("--tier", choices=("ci", "full"), default="ci")
    s.add_argument("--out", type=Path, default=Path(DEFAULT_OUT))
    s.add_argument("--script", type=Path, default=None)
    s.add_argument("--only", nargs="*", default=None, help="run only these scenario names")
    c = sub.add_parser("check", help="validate scenario files without running them")
    c.add_argument("files", type=Path, nargs="+", metavar="SCENARIO.yaml|DIR",
                   help="scenario files, or directories whose *.yaml files are checked")
    return p


def check(paths: list[Path]) -> int:
    """Validate every file (a directory: its ``*.yaml`` files); print ``ok`` lines to stdout and each error
    to stderr. Returns 0 when all are valid, else 2."""
    failed = total = 0
    for arg in paths:
        try:
            files = scenario_files(arg) if arg.is_dir() else [arg]
        except scn.ScenarioError as exc:
            print(f"resilient-chaos: {exc}", file=sys.stderr)
            failed, total = failed + 1, total + 1
            continue
        for f in files:
            total += 1
            try:
                s = scn.load(f)
            except scn.ScenarioError as exc:
                failed += 1
                print(f"resilient-chaos: {exc}", file=sys.stderr)
                continue
            print(f"{f}: ok ({s.name}, tier {s.tier}, {len(s.faults)} fault(s))")
    if failed:
        print(f"resilient-chaos: {failed} of {total} input(s) failed the check (errors above).", file=sys.stderr)
        return 2
    return 0


def _interruptible() -> None:
    """SIGTERM (a CI timeout) and SIGINT (even when inherited as ignored by a background job) stop the run
    through the normal unwinding, so every ``finally`` teardown runs before the process exits."""

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.configure("WARNING")
    _interruptible()
    try:
        if args.cmd == "check":
            return check(args.files)
        if args.cmd == "run":
            s = scn.load(args.scenario)
            seed = s.seed if args.seed is None else args.seed
            repro = f"resilient-chaos run {shlex.quote(str(args.scenario))} --seed {seed} --out {shlex.quote(str(args.out))}"
            if args.script:
                repro += f" --script {shlex.quote(str(args.script))}"
            progress = Progress()
            rep = run_scenario(s, script=args.script, seed=args.seed, out=args.out, progress=progress, repro=repro)
            progress.done(f"{s.name}: {rep['verdict'].upper()}" + (f" ({rep['reason']})" if rep.get("reason") else ""))
            print(f"report: {rep['artifacts']}/report.md")
            return {"pass": 0, "fail": 1, "skip": 2}[rep["verdict"]]
        verdict, reports = run_suite(args.directory, args.tier, args.out, script=args.script, only=args.only)
        print(report.summary_markdown(reports, verdict, 0.0).rsplit("\n", 1)[0])
        print(f"suite {args.tier}: {verdict.upper()}; table in {args.out / 'suite.md'}")
        return 0 if verdict == "pass" else 1
    except scn.ScenarioError as exc:
        print(f"resilient-chaos: {exc}", file=sys.stderr)
        return 2
    except ChaosError as exc:
        print(f"resilient-chaos: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

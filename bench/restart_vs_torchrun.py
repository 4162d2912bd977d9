"""Worker-restart time: torchrun vs resilient-run, measured in the same run.

The same 2-worker gloo DDP job (``bench/_ddp_job.py``: an unmodified torchrun script for torchrun, the
same model and loop under ``@resilient.elastic`` for resilient-run) runs under each launcher; once both
ranks finished step ``--kill-after``, rank 1 is SIGKILLed. Measured: seconds from the kill until every rank
has finished its next step; for resilient the phases (detect, rendezvous, spawn to user code, first step,
and the survivor's in-process recovery).

    python bench/restart_vs_torchrun.py [--repeats 1]

Prints one JSON line: {"torchrun_s", "resilient_s", "ratio", "resilient_phases", ...}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench._launch import resilient_phases, run_killed_retrying  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--kill-after", type=int, default=15)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--sleep", type=float, default=0.05)
    p.add_argument("--timeout", type=float, default=120.0, help="per run; a hung run is retried")
    args = p.parse_args()
    job = ["--hidden", "256", "--layers", "2", "--steps", str(args.steps), "--sleep", str(args.sleep)]
    torch_s, res_s, phases, failed = [], [], [], {"torchrun": [], "resilient": []}
    for _ in range(args.repeats):
        t, tf = run_killed_retrying("torchrun", job, kill_after=args.kill_after, timeout=args.timeout)
        r, rf = run_killed_retrying("resilient", job, kill_after=args.kill_after, timeout=args.timeout)
        failed["torchrun"] += tf
        failed["resilient"] += rf
        torch_s.append(t["recovery_s"])
        res_s.append(r["recovery_s"])
        phases.append(resilient_phases(r))
        for res in (t, r):
            shutil.rmtree(res["out"], ignore_errors=True)
    tr, rs = statistics.median(torch_s), statistics.median(res_s)
    print(json.dumps({
        "torchrun_s": round(tr, 3),
        "resilient_s": round(rs, 3),
        "ratio": round(rs / tr, 3),
        "resilient_phases": phases[len(phases) // 2],
        "repeats": args.repeats,
        "failed_runs": {k: len(v) for k, v in failed.items()},
        "failures": failed,
        "torchrun_runs": [round(x, 3) for x in torch_s],
        "resilient_runs": [round(x, 3) for x in res_s],
    }))


if __name__ == "__main__":
    main()

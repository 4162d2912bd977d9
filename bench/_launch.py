"""Shared plumbing of the launcher benchmarks: run a 2-worker job under torchrun or resilient-run, SIGKILL
rank 1 after a given step, and time recovery from the per-step logs the job writes (``bench/_ddp_job.py``)."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from resilient import events

ROOT = pathlib.Path(__file__).resolve().parent.parent
JOB = str(ROOT / "bench" / "_ddp_job.py")


def read_steps(path: pathlib.Path) -> list[tuple[int, float, int, float]]:
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 5:
            rows.append((int(parts[0]), float(parts[1]), int(parts[2]), float(parts[4])))
    return rows


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill the launcher and every process below it (torchrun starts each worker in its own session)."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_killed(launcher: str, job_args: list[str], *, kill_after: int, timeout: float = 300.0) -> dict:
    """Run the job, SIGKILL rank 1 once both ranks finished step ``kill_after``; returns the timings."""
    out = pathlib.Path(tempfile.mkdtemp(prefix=f"bench-{launcher}-"))
    ev = out / "events.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), RESILIENT_EVENT_LOG=str(ev))
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--max-restarts", "3", "--monitor-interval", "0.1", JOB, "--mode", "plain"]
    else:
        cmd = [sys.executable, "-m", "resilient.run", "--standalone", "--nproc-per-node", "2",
               "--monitor-interval", "0.1", "--event-log", str(ev), JOB, "--mode", "elastic"]
    cmd += [*job_args, "--out", str(out)]
    log = open(out / "launcher.log", "wb")
    proc = subprocess.Popen(cmd, env=env, cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        victim = None
        while time.monotonic() < deadline:
            r0, r1 = read_steps(out / "steps-0.txt"), read_steps(out / "steps-1.txt")
            if r0 and r1 and r0[-1][0] >= kill_after and r1[-1][0] >= kill_after:
                victim = r1[-1][2]
                break
            if proc.poll() is not None:
                raise RuntimeError(f"{launcher} exited before the kill:\n{(out / 'launcher.log').read_text()[-3000:]}")
            time.sleep(0.01)
        if victim is None:
            raise RuntimeError(f"{launcher}: the job did not reach step {kill_after} in {timeout}s")
        t_kill = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        code = proc.wait(max(1.0, deadline - time.monotonic()))
    except BaseException:
        _kill_tree(proc)
        log.close()
        shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        _kill_tree(proc)
        log.close()
    if code != 0:
        tail = (out / "launcher.log").read_text()[-3000:]
        shutil.rmtree(out, ignore_errors=True)
        raise RuntimeError(f"{launcher} exited with {code}:\n{tail}")
    result = {"out": str(out), "t_kill": t_kill, "exit": code}
    rows = [read_steps(out / f"steps-{rank}.txt") for rank in (0, 1)]
    next_steps, before, afters = [], [], []
    for rank_rows in rows:
        done_before = [r for r in rank_rows if r[1] <= t_kill]
        after = [r for r in rank_rows if r[1] > t_kill]
        before.append(done_before[-1][0] if done_before else -1)
        next_steps.append(after[0])
        afters.append(after)
    result["recovery_s"] = max(r[1] for r in next_steps) - t_kill
    result["steps_lost"] = max(0, max(before) + 1 - min(r[0] for r in next_steps))
    # back where it was: every rank finished the first step beyond the last one any rank finished before the kill
    # (recomputed steps included; None when the run ended before that step)
    beyond = max(before) + 1
    firsts = [next((r[1] for r in after if r[0] >= beyond), None) for after in afters]
    result["caught_up_s"] = None if None in firsts else max(firsts) - t_kill
    stalls = [r[3] for r in rows[0] if r[3] > 0]
    result["stall_s"] = max(stalls) if stalls else 0.0
    result["events"] = events.read(str(ev))
    result["next_step_mono"] = max(r[1] for r in next_steps)
    return result


def run_killed_retrying(launcher: str, job_args: list[str], *, kill_after: int, timeout: float,
                        attempts: int = 3) -> tuple[dict, list[str]]:
    """``run_killed`` until one run completes; returns it and the failures of the runs before it (torchrun's
    restarts sometimes fail outright or hang: gloo cannot reconnect)."""
    failures: list[str] = []
    for _ in range(attempts):
        try:
            return run_killed(launcher, job_args, kill_after=kill_after, timeout=timeout), failures
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            failures.append(str(exc).splitlines()[0][:200])
    raise RuntimeError(f"{launcher}: no run completed in {attempts} attempts: {failures}")


def _job_marks(out: pathlib.Path, t_kill: float) -> dict:
    """Seconds from the kill until the slowest rank re-entered the train function, built its model and
    finished ``protect`` (the restore), from the ``phases-<rank>.txt`` marks of ``_ddp_job.py``."""
    latest: dict[str, float] = {}
    for path in out.glob("phases-*.txt"):
        for line in path.read_text().splitlines():
            what, mono, _pid = line.split()
            if float(mono) > t_kill:
                latest[what] = max(latest.get(what, 0.0), float(mono) - t_kill)
    names = {"enter": "entered_train_fn_s", "model": "model_built_s", "protect": "restored_s"}
    return {names[k]: round(v, 4) for k, v in latest.items() if k in names}


def resilient_phases(result: dict) -> dict:
    """detect / rendezvous / spawn / restore reads / first step of the recovery, from the agent's and
    workers' events."""
    evs, t_kill = result["events"], result["t_kill"]
    exit_ev = next(e for e in evs if e["kind"] == "worker.exit" and e["mono"] > t_kill)
    formed = next(e for e in evs if e["kind"] == "gen.formed" and "in_process" in e and e["mono"] > t_kill)
    execs = [e for e in evs if e["kind"] == "worker.exec" and e["mono"] > t_kill]
    recov = [e for e in evs if e["kind"] == "recover.done" and e["mono"] > t_kill]
    stalls = [e["stall_s"] for e in evs if e["kind"] == "snapshot.sealed"]
    reads = [e["seconds"] for e in evs if e["kind"] == "restore.done" and e["mono"] > t_kill]
    marks = _job_marks(pathlib.Path(result["out"]), t_kill)
    return {
        **marks,
        "detect_s": round(exit_ev["mono"] - t_kill, 4),
        "rendezvous_s": round(formed["rendezvous_s"], 4),
        "spawn_to_user_code_s": round(execs[0]["startup_s"], 4) if execs else None,
        "spawn_how": execs[0]["how"] if execs else None,
        "first_step_s": round(result["next_step_mono"] - formed["mono"], 4),
        "survivor_in_process_s": round(recov[0]["seconds"], 4) if recov else None,
        "restore_read_s": [round(r, 4) for r in reads],  # each rank's snapshot read (open, copy, verify)
        "snapshot_stall_s": round(sorted(stalls)[len(stalls) // 2], 6) if stalls else None,
    }

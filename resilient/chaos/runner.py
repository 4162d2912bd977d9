"""Runs one scenario end to end: preflight, baseline (calibration), setup, chaos, census, teardown, checks.

``execute`` drives one job (with or without faults) and returns what happened; ``run_scenario`` wraps
it with the baseline, the invariant checks and the report. The loop tails the event files, feeds the
trigger engine, injects due faults, runs timed follow-ups and heals, and stops when every started agent
has exited or the deadline passes. Teardown runs in ``finally`` whatever happened.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from resilient.chaos import calibrate, etcdlog, invariants as inv, metrics as M, preflight
from resilient.chaos.eventlog import Event, EventTail, fields_match, read_dir
from resilient.chaos.faults import ACTIONS, Injection, Plan
from resilient.chaos.progress import Progress
from resilient.chaos.scenario import Fault, Scenario
from resilient.chaos.teardown import Teardown, wait_gone
from resilient.chaos.topology import DEFAULT_SCRIPT, Cluster
from resilient.errors import ChaosError
from resilient.etcd.server import find_etcd_binary
from resilient.logs import get_logger

log = get_logger(__name__)

TICK_S = 0.05
TRACK_EVERY_S = 1.0  # how often the process trees below the agents are recorded (orphans stay tracked)
FAILPOINT_HOLD_MS = 3000
STARTUP_LIMIT_S = 180.0  # launch to first step: import and rendezvous on a loaded machine


class ChaosLog:
    """The harness's own event file (``events/chaos.jsonl``), same record shape as ``resilient.events``."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        ev = {"ts": time.time(), "mono": time.monotonic(), "kind": kind, "node": "chaos", "pid": os.getpid()}
        ev.update(fields)
        os.write(self._fd, (json.dumps(ev, default=str) + "\n").encode())
        return ev

    def close(self) -> None:
        os.close(self._fd)


@dataclass
class Execution:
    run_dir: Path
    t_start: float
    events: list[Event] = field(default_factory=list)
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    timed_out: bool = False
    wall_s: float = 0.0
    errors: list[str] = field(default_factory=list)
    census: dict[str, list[str]] = field(default_factory=dict)
    teardown_problems: list[str] = field(default_factory=list)
    logs_text: str = ""
    history: list[etcdlog.Change] | None = None  # what etcd accepted under the job prefix, in revision order
    history_error: str | None = None
    durable: list[str] | None = None  # None: no persistence; else one sentence per visible checkpoint problem
    durable_seen: list[int] = field(default_factory=list)  # steps of the visible (manifest-committed) checkpoints


def _script_args(scenario: Scenario, script: Path, seed: int, run_dir: Path) -> list[str]:
    if script.resolve() != DEFAULT_SCRIPT.resolve():
        return []
    t = scenario.training
    return ["--steps", str(t.steps), "--logical-shards", str(t.logical_shards), "--hidden", str(t.hidden),
            "--lr", repr(t.lr), "--seed", str(seed), "--step-sleep-ms", f"{t.step_sleep_ms:g}",
            "--hash-out", str(run_dir / "final_hash.txt")]


def _lease_count(endpoints: list[str]) -> int | None:
    etcdctl = Path(find_etcd_binary()).with_name("etcdctl")
    if not etcdctl.exists():
        return None
    res = subprocess.run([str(etcdctl), f"--endpoints={','.join(endpoints)}", "--command-timeout=3s", "lease", "list"],
                         capture_output=True, text=True, env=dict(os.environ, ETCDCTL_API="3"), timeout=10)
    if res.returncode != 0:
        return None
    first = res.stdout.split("\n", 1)[0]  # "found N leases"
    parts = first.split()
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None


def execute(scenario: Scenario, run_dir: Path, *, script: Path, seed: int, deadline_s: float, with_faults: bool,
            progress: Progress | None = None) -> Execution:
    run_dir.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:4]
    job = f"chaos-{scenario.name[:20]}-{tag}"
    faults = list(scenario.faults) if with_faults else []
    teardown = Teardown()
    clog = ChaosLog(run_dir / "events" / "chaos.jsonl")
    ex = Execution(run_dir=run_dir, t_start=time.monotonic())
    cluster: Cluster | None = None
    try:
        plan = Plan()
        for f in faults:
            ACTIONS[f.action].prepare(f, plan, scenario.topology)
            if f.trigger.kind == "failpoint":
                hold = int(f.params.get("hold_ms", FAILPOINT_HOLD_MS))
                plan.arm(f.trigger.host or f.target["host"], f.trigger.value, f"1*sleep({hold})")
        cluster = Cluster(scenario, run_dir, teardown, script=script,
                          script_args=_script_args(scenario, script, seed, run_dir),
                          failpoints={h: ",".join(v) for h, v in plan.failpoints.items()},
                          inworker={h: ";".join(v) for h, v in plan.inworker.items()}, job=job)
        clog.emit("chaos.run.start", scenario=scenario.name, job=job, with_faults=with_faults, seed=seed)
        cluster.start_network(tag)
        cluster.start_etcd()
        cluster.make_persist_dir()
        for h in plan.proxied:
            cluster.proxy_etcd_for(h)
        for h in scenario.topology.launch_hosts:
            cluster.start_host(h.name)
        _loop(scenario, cluster, faults, clog, ex, deadline_s, progress)
        ex.census = _census(scenario, cluster, ex)
    except ChaosError as exc:
        ex.errors.append(str(exc))
    except Exception as exc:  # a harness bug must still end in a report and a teardown
        ex.errors.append(f"harness error: {exc!r}")
        log.error("harness error:\n%s", traceback.format_exc())
    finally:
        if cluster is not None:
            ex.exit_codes = {n: h.exit_code() for n, h in cluster.hosts.items()}
            cluster.stop_all(timeout=3.0)
            clog.emit("chaos.stopped")
            _read_history(cluster, ex)
            _check_durable(cluster, ex)
            clog.emit("chaos.inspected")
        ex.teardown_problems = teardown.run()
        from resilient.chaos import netns

        if scenario.topology.network == "netns":
            left = netns.leftover_namespaces(tag)
            if left:
                ex.teardown_problems.append(f"namespaces left after teardown: {left}")
            links = netns.leftover_links(tag)
            if links:
                ex.teardown_problems.append(f"network links left after teardown: {links}")
        if cluster is not None and cluster.persist_mounted and _mounted(cluster.run_dir / "persist"):
            ex.teardown_problems.append(f"tmpfs {cluster.run_dir / 'persist'} still mounted after teardown")
        clog.emit("chaos.run.end", timed_out=ex.timed_out)
        clog.close()
        ex.wall_s = time.monotonic() - ex.t_start
        ex.events = read_dir(run_dir / "events")
        ex.logs_text = _logs_tail(run_dir)
    return ex


def _check_durable(cluster: Cluster, ex: Execution) -> None:
    """Every durable checkpoint whose manifest is visible must verify completely (old or new, never a mix
    of steps or a torn file); directories without a manifest are partial persists and are ignored."""
    if cluster.persist_dir is None:
        return
    from resilient.errors import PersistError
    from resilient.persist import reader
    from resilient.persist.fs import open_storage

    problems: list[str] = []
    try:
        storage = open_storage(str(cluster.persist_dir))
        for step, name in reader.list_checkpoints(storage):
            try:
                manifest = reader.read_manifest(storage, name)
            except PersistError:
                continue  # no manifest: a persist that did not finish, invisible to readers
            try:
                reader.verify(manifest)
                if manifest.step != step:
                    problems.append(f"{name} holds a manifest of step {manifest.step}")
                ex.durable_seen.append(step)
            except PersistError as exc:
                problems.append(f"visible checkpoint {name} does not verify: {exc}")
    except (PersistError, OSError) as exc:
        problems.append(f"the persist directory {cluster.persist_dir} could not be inspected: {exc}")
    ex.durable = problems


def _mounted(path: Path) -> bool:
    try:
        with open("/proc/self/mounts", encoding="utf-8") as fh:
            return any(line.split()[1] == str(path) for line in fh if len(line.split()) > 1)
    except OSError:
        return False


def _read_history(cluster: Cluster, ex: Execution) -> None:
    """Replay what etcd accepted during the run (before teardown kills it); a failure is recorded, and the
    checks that need the history then fail rather than pass on events alone."""
    if cluster.etcd is None:
        ex.history_error = "etcd never started"
        return
    try:
        etcdlog.wait_readable(cluster.etcd.settings, 15.0)
        ex.history = etcdlog.read(cluster.etcd.settings, cluster.job)
        etcdlog.write(ex.run_dir / "etcd_history.jsonl", ex.history)
    except ChaosError as exc:
        ex.history_error = str(exc)


def _logs_tail(run_dir: Path, limit: int = 20000) -> str:
    parts = []
    for p in sorted((run_dir / "logs").glob("*.out")):
        try:
            parts.append(p.read_text(errors="replace")[-limit:])
        except OSError:
            continue
    return "\n".join(parts)


def _loop(scenario: Scenario, cluster: Cluster, faults: list[Fault], clog: ChaosLog, ex: Execution,
          deadline_s: float, progress: Progress | None) -> None:
    from resilient.chaos.triggers import TriggerEngine

    engine = TriggerEngine(faults)
    tail = EventTail(cluster.events_dir)
    scheduled: list[tuple[float, str, Callable[[], Any]]] = []
    awaiting: dict[str, tuple[Fault, Injection]] = {}
    injections: dict[str, Injection] = {}
    startup_limit_s = max(STARTUP_LIMIT_S, deadline_s)
    deadline = ex.t_start + startup_limit_s + deadline_s
    state: dict[str, Any] = {"step": None, "gen": None, "ws": None, "first_step_t": None, "tracked_t": 0.0}
    for f in faults:  # armed inside the processes at launch: await their evidence from the start
        if ACTIONS[f.action].armed_at_launch(f):
            engine.started(f.id)
            awaiting[f.id] = (f, Injection(deferred=True))

    def fired(f: Fault, inj: Injection, t: float) -> None:
        clog.emit("fault.fired", id=f.id, action=f.action, at=t, target=dict(f.target), **inj.fields)
        engine.fired(f.id, t)
        for delay, fn in inj.followups:
            scheduled.append((t + delay, f"{f.id}:followup", _wrap(f, fn, "fault.step")))
        if f.heal.after is not None:
            scheduled.append((t + f.heal.after, f"{f.id}:heal", _wrap(f, lambda: ACTIONS[f.action].heal(f, cluster, inj),
                                                                      "fault.healed")))

    def _wrap(f: Fault, fn: Callable[[], Any], kind: str) -> Callable[[], None]:
        def run() -> None:
            try:
                res = fn() or {}
            except (ChaosError, OSError) as exc:
                ex.errors.append(f"fault {f.id}: {kind} failed: {exc}")
                clog.emit(kind, id=f.id, action=f.action, ok=False, error=str(exc))
                return
            clog.emit(kind, id=f.id, action=f.action, ok=True, **res)
        return run

    while True:
        now = time.monotonic()
        evs = tail.poll()
        cluster.observe(evs)
        engine.observe(evs)
        for ev in evs:
            if ev.get("kind") == "step.done":
                state.update(step=ev.get("step"), gen=ev.get("gen"), ws=ev.get("world_size"))
            for fid, (f, inj) in list(awaiting.items()):
                if ACTIONS[f.action].evidence(f, ev):
                    del awaiting[fid]
                    inj.fields.update({"host": f.target.get("host"), "evidence": ev.get("kind"),
                                       "evidence_pid": ev.get("pid")})
                    fired(f, inj, float(ev.get("mono", now)))
        for f in engine.due(now):
            engine.started(f.id)
            try:
                inj = ACTIONS[f.action].inject(f, cluster)
            except (ChaosError, OSError) as exc:
                ex.errors.append(f"fault {f.id} could not be injected: {exc}")
                clog.emit("fault.failed", id=f.id, action=f.action, error=str(exc))
                continue
            injections[f.id] = inj
            if inj.deferred:
                awaiting[f.id] = (f, inj)
            else:
                fired(f, inj, time.monotonic())
        if now - state["tracked_t"] >= TRACK_EVERY_S:
            cluster.track_trees()
            state["tracked_t"] = now
        scheduled.sort(key=lambda x: x[0])
        while scheduled and scheduled[0][0] <= time.monotonic():
            _, _, fn = scheduled.pop(0)
            fn()
        if progress:
            progress.update(scenario.name, time.monotonic() - ex.t_start, state["step"], state["gen"], state["ws"],
                            len(faults) - len(engine.unfired()), len(faults))
        started = [h for h in cluster.hosts.values() if h.proc is not None]
        if started and not any(h.running() for h in started) and not scheduled:
            break
        if state["first_step_t"] is None and state["step"] is not None:
            state["first_step_t"] = time.monotonic()
            deadline = state["first_step_t"] + deadline_s  # training time, apart from start-up
        if state["first_step_t"] is None and time.monotonic() > ex.t_start + startup_limit_s:
            ex.timed_out = True
            ex.errors.append(f"no step completed within the start-up limit of {startup_limit_s:.0f}s")
            break
        if time.monotonic() > deadline:
            ex.timed_out = True
            ex.errors.append(f"deadline of {deadline_s:.0f}s after the first step passed before the job ended")
            break
        time.sleep(TICK_S)


def _census(scenario: Scenario, cluster: Cluster, ex: Execution) -> dict[str, list[str]]:
    """What the runtime left behind after its agents exited (before the harness's own teardown)."""
    out: dict[str, list[str]] = {}
    out["processes"] = [str(p) for p in wait_gone(cluster.all_pids(), 5.0)] if not ex.timed_out else []
    # Segments of hosts that ended cleanly must be gone (a killed host cannot clean up after itself).
    clean = [n for n, h in cluster.hosts.items() if h.exit_code() == 0 and not h.lost]
    deadline = time.monotonic() + 3.0
    left = [s for n in clean for s in cluster.segments_of(n)]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [s for n in clean for s in cluster.segments_of(n)]
    out["shm_segments"] = sorted(left)
    out["agent_run_dirs"] = sorted(str(d) for n in clean for d in cluster.agent_dirs(n))
    leases: list[str] = []
    if cluster.etcd is not None and not ex.timed_out:  # agents still running at the deadline hold leases
        try:
            lease_deadline = time.monotonic() + scenario.runtime.lease_ttl + 2.0
            count = _lease_count(cluster.etcd_endpoints)
            while count and time.monotonic() < lease_deadline:
                time.sleep(0.25)
                count = _lease_count(cluster.etcd_endpoints)
            if count is None:
                ex.errors.append("lease census failed: 'etcdctl lease list' gave no answer")
            elif count:
                leases = [f"{count} live lease(s) after the job ended and TTL passed"]
        except (subprocess.SubprocessError, OSError) as exc:
            ex.errors.append(f"lease census failed: {exc}")
    out["leases"] = leases
    rules = []
    if cluster.network is not None:
        healed = {str(ev.get("id")) for ev in read_dir(cluster.events_dir) if ev.get("kind") == "fault.healed"}
        for f in scenario.faults:
            host = f.target.get("host")
            if f.action == "partition" and f.id in healed and host in cluster.network.hosts:
                rules += [f"{host}: {r}" for r in cluster.network.rules(host)]
    out["iptables_rules"] = rules  # rules a heal should have removed
    return out


# --- one scenario with its baseline, checks and report ---------------------------------------------------

def baseline_for(scenario: Scenario, script: Path, seed: int, out: Path, progress: Progress | None, *,
                 fresh: dict[str, str] | None = None) -> tuple[calibrate.Calibration | None, str | None]:
    """The fault-free calibration run for this scenario's configuration, shared by every scenario with the
    same key (``calibrate.key``: script, training, seed, launch hosts, network, runtime source). With
    ``fresh`` (a suite run), a key is calibrated once per suite run, so the bounds reflect the machine's
    load now; otherwise a baseline cached under ``OUT/baselines/`` by the same code is reused."""
    k = calibrate.key(scenario, script, seed)
    path = out / "baselines" / f"{k}.json"
    cal = calibrate.load(path)
    if fresh is not None and fresh.get(k):
        return None, fresh[k]  # this suite run's baseline for the key already failed: do not rerun it
    if cal is not None and cal.state_hash and (fresh is None or k in fresh):
        return cal, None
    hosts = scenario.topology.launch_hosts
    base = dataclasses.replace(scenario, faults=(), name=f"{scenario.name}-baseline"[:41],
                               topology=dataclasses.replace(scenario.topology, hosts=hosts, etcd_members=1,
                                                            network="loopback"),
                               runtime=calibrate.baseline_runtime(scenario))
    run_dir = out / "baselines" / k
    if run_dir.exists():
        shutil.rmtree(run_dir)
    path.unlink(missing_ok=True)
    ex = execute(base, run_dir, script=script, seed=seed, deadline_s=scenario.deadline_s or 180.0, with_faults=False,
                 progress=progress)
    cal = calibrate.from_events(k, ex.events, ex.t_start, str(run_dir))
    problems = list(ex.errors) + calibrate.fault_free_problems(ex.events, ex.exit_codes)
    if not cal.state_hash and not problems:
        problems.append("no train.done with a state hash")
    if problems:
        err = f"the fault-free baseline run was not clean: {'; '.join(problems[:4])}; see {run_dir}"
        if fresh is not None:
            fresh[k] = err
        return None, err
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cal.to_json(), indent=1))
    if fresh is not None:
        fresh[k] = ""
    return cal, None


def default_reactions(scenario: Scenario) -> list[str]:
    if scenario.expect.reactions:
        return list(scenario.expect.reactions)
    out: list[str] = []
    for f in scenario.faults:
        out += list(ACTIONS[f.action].reactions)
    return out


def evaluate(scenario: Scenario, ex: Execution, cal: calibrate.Calibration | None) -> tuple[list[inv.Check], M.RunMetrics]:
    events = ex.events
    m = M.compute(events, baseline_train_s=cal.train_s if cal else None, t0=ex.t_start)
    checks = [
        inv.fault_fired(scenario, events),
        inv.reaction(default_reactions(scenario), events),
        inv.committed_not_lost(events, allowed=scenario.expect.committed_loss_allowed, history=ex.history),
        inv.no_step_gap(events),
        inv.one_assignment(events, ex.history, ex.history_error),
        inv.no_stale_write(events, ex.history, ex.history_error),
        inv.committed_monotonic(ex.history, ex.history_error),
        inv.restores_verified(events),
        inv.restores_consistent(events),
        inv.durable_consistent(ex.durable, ex.durable_seen),
        inv.final_state(scenario, events, cal.state_hash if cal else None, cal.final_loss if cal else None),
        inv.outcome(scenario, events, ex.exit_codes, ex.logs_text),
        inv.leftovers(ex.census),
        inv.commits_resume(scenario, m, cal.final_committed if cal else None),
    ]
    for e in scenario.expect.events:
        present = any(ev.get("kind") == e["kind"] and fields_match(ev, e["where"]) for ev in events)
        checks.append(inv.Check(f"event:{e['kind']}", inv.PASS if present else inv.FAIL,
                                f"{e['kind']} {e['where'] or ''} {'present' if present else 'never emitted'}."))
    bound = scenario.expect.recovery_s if scenario.expect.recovery_s != "auto" else (
        calibrate.recovery_bound(scenario, cal) if cal else None)
    checks += inv.bounds(scenario, m, bound)  # type: ignore[arg-type]
    if ex.timed_out:
        checks.append(inv.Check("deadline", inv.FAIL, f"the job did not end within {ex.wall_s:.0f}s."))
    else:
        checks.append(inv.Check("deadline", inv.PASS, f"the job ended after {ex.wall_s:.1f}s."))
    if ex.errors:
        checks.append(inv.Check("harness", inv.FAIL, "; ".join(ex.errors[:4])))
    if ex.teardown_problems:
        checks.append(inv.Check("teardown", inv.FAIL, "; ".join(ex.teardown_problems[:4])))
    return checks, m


def run_scenario(scenario: Scenario, *, script: Path | None, seed: int | None, out: Path,
                 progress: Progress | None = None, repro: str = "",
                 fresh_baselines: dict[str, str] | None = None) -> dict[str, Any]:
    from resilient.chaos import report

    script = (script or DEFAULT_SCRIPT).resolve()
    out = Path(out).resolve()  # the agents run in their own directories: every path handed to them is absolute
    seed = scenario.seed if seed is None else seed
    run_dir = out / scenario.name / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    reasons = preflight.check(scenario, script)
    if reasons:
        rep = report.skipped(scenario, seed, run_dir, reasons, repro)
        report.write(rep, run_dir, None, None)
        return rep
    cal, err = baseline_for(scenario, script, seed, out, progress, fresh=fresh_baselines)
    if cal is None:
        rep = report.failed_setup(scenario, seed, run_dir, err or "no baseline", repro)
        report.write(rep, run_dir, None, None)
        return rep
    scenario, adapted = calibrate.adapt_runtime(scenario, cal)
    ex = execute(scenario, run_dir, script=script, seed=seed, deadline_s=calibrate.deadline(scenario, cal),
                 with_faults=True, progress=progress)
    checks, m = evaluate(scenario, ex, cal)
    rep = report.build(scenario, seed, run_dir, ex, checks, m, cal, repro, time.monotonic() - t0)
    if adapted:
        rep["runtime_adapted"] = adapted
    report.write(rep, run_dir, ex, m)
    return rep

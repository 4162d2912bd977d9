"""``NodeAgent``: the main loop of ``resilient-run`` on one node.

It joins generations through the rendezvous, starts this node's workers (forked from a warm zygote when
safe), watches them every monitor interval (exit, hang), publishes faults so that every node reacts at
once, and moves workers to the next generation with the cheapest safe tier:

* a worker that registered (``@resilient.elastic``) and is still alive recovers in-process: its control
  block's ``target_generation`` makes it stop at the next step boundary and ``WaitGeneration`` hands it the
  new assignment;
* a dead worker is respawned (only that one), and restores from the snapshot its agent still holds;
* a live worker that did not register (an unmodified torchrun script) is restarted as a process.

SIGTERM (preemption): workers are asked to stop after the current step and snapshot, the node leaves the
rendezvous, and the agent exits 0. The job fails (exit 1) when the restart budget is spent, the job is
closed as failed elsewhere, or no generation forms in time; the exit summary names the first failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass

from resilient import events, logs
from resilient.agent import hang, summary
from resilient.agent.hub import WorkerHub
from resilient.agent.metrics import AgentMetrics
from resilient.agent.settings import AgentSettings
from resilient.agent.snapshots import LocalSnapshots
from resilient.agent.store_host import StoreHost, generation_env_port
from resilient.agent.supervisor import Supervisor, WorkerHandle, describe_exit, pid_exists
from resilient.agent.worker_env import AgentPaths, worker_environment
from resilient.agent.worker_service import WorkerService, serve
from resilient.agent.waker import Waker
from resilient.agent.zygote import ZygoteClient, anon_bytes_of
from resilient.errors import (
    ConfigError,
    EtcdError,
    EtcdUnavailableError,
    FencedError,
    PersistError,
    RendezvousClosedError,
    RendezvousError,
    RestartBudgetExceededError,
)
from resilient.keys import JobKeys
from resilient.rendezvous.state import member_failed
from resilient.runtime.api import WorkerAssignment
from resilient.runtime.control import ControlBlock

log = logs.get_logger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
ZYGOTE_READY_TIMEOUT = 60.0


def _ensure_importable() -> None:
    """Workers and the zygote run ``python -m resilient...``: make this package importable for them too."""
    import resilient

    root = os.path.dirname(os.path.dirname(os.path.abspath(resilient.__file__)))
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *parts])


RUN_DIR_PREFIX = "rsl-agent-"


def reclaim_stale_run_dirs(directory: str) -> list[str]:
    """Remove run directories (control blocks, socket) of agents that died without cleaning up."""
    removed = []
    for name in os.listdir(directory):
        if not name.startswith(RUN_DIR_PREFIX):
            continue
        pid_text = name[len(RUN_DIR_PREFIX):].split("-", 1)[0]
        if not pid_text.isdigit() or pid_exists(int(pid_text)):
            continue
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        removed.append(name)
    return removed


def _job_token(job: str) -> bytes:
    """The per-job secret peers authenticate with: ``$RESILIENT_JOB_TOKEN`` when set (recommended on shared
    networks), else derived from the job id."""
    import hashlib

    from resilient import env

    secret = env.get(env.JOB_TOKEN)
    return hashlib.sha256((secret or f"resilient-job:{job}").encode()).digest()


class _LazyRendezvous:
    """The ShardManager is built before the Rendezvous (the node announces the manager's ports)."""

    def __init__(self, agent: "NodeAgent") -> None:
        self._agent = agent

    def __getattr__(self, name: str):
        return getattr(self._agent.rdzv, name)


class _ShardManagerAdapter:
    """The ShardManager behind the worker service's per-rank interface (it also needs the assignment)."""

    def __init__(self, manager, agent: "NodeAgent") -> None:
        self.manager = manager
        self._agent = agent

    def segment_for(self, rank: int, nbytes: int) -> str:
        return self.manager.segment_for(rank, nbytes)

    def on_sealed(self, rank: int, step: int, generation: int, nbytes: int) -> None:
        self.manager.on_sealed(rank, step, generation, nbytes)

    def prepare_restore(self, rank: int):
        return self.manager.prepare_restore(rank, self._agent.assignment)

    def committed_step(self) -> int | None:
        return self.manager.committed_step()

    def before_overwrite(self, rank: int, segment: str):
        return self.manager.before_overwrite(rank, segment)

    def on_generation(self, ranks, world_size, generation=None) -> None:
        self.manager.on_generation(self._agent.assignment)

    def close(self, unlink: bool = True) -> None:
        self.manager.close(unlink)


def _proc_state(pid: int) -> str:
    """The kernel's one-letter state of ``pid`` (R running, S sleeping, T stopped, ...), '?' if unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


class _Exit(Exception):
    """Leave the main loop with an exit code and outcome line."""

    def __init__(self, code: int, outcome: str) -> None:
        super().__init__(outcome)
        self.code = code
        self.outcome = outcome


@dataclass
class _Round:
    generation: int  # the generation whose end this announces
    reason: str
    at: float  # monotonic


class NodeAgent:
    def __init__(self, settings: AgentSettings) -> None:
        self.s = settings
        self.keys = JobKeys(settings.job_id)
        self.hub = WorkerHub()
        self.metrics = AgentMetrics()
        self.handles: dict[int, WorkerHandle] = {}
        self.assignment = None  # rendezvous Assignment of the current generation
        self.worker_assignments: dict[int, WorkerAssignment] = {}
        self.first_failure: summary.Failure | None = None
        self.restarts = 0
        self.restart_count = 0
        self.finished: set[int] = set()  # slots whose worker exited 0 in the current generation
        self._closed: tuple[str, str] | None = None  # (status, reason) once the job is closed
        self._round: _Round | None = None
        self._round_lock = threading.Lock()
        self._wake = Waker()  # not a threading.Event: signal handlers set it (see waker.py)
        self._preempt: str | None = None  # the stop signal's name, once one arrived
        self._fault_gens: set[int] = set()
        self._attempt = 0
        self._first_step_pending: tuple[float, int] | None = None  # (fault mono, generation)
        self._last_progress = -1
        self._last_committed: int | None = None
        self._sent_bytes = 0  # the shard manager's sent-bytes counter, as last fed into the metric
        self.rdzv = None
        self.kv = None
        self.etcd_server = None
        self.zygote: ZygoteClient | None = None
        self.store: StoreHost | None = None
        self.snapshots = None
        self.server = None
        self.supervisor: Supervisor | None = None
        self.run_dir = ""
        self.durable = None

    # ------------------------------------------------------------------------------------------------
    # start-up
    # ------------------------------------------------------------------------------------------------
    def connect(self) -> None:
        """Bind the metrics port (``--metrics-port``), then reach etcd (or start the embedded one). Raises
        (``ConfigError`` for a port that cannot be bound, ``EtcdError``) before anything else is started."""
        from resilient.config import EtcdSettings
        from resilient.etcd.client import EtcdKV

        if self.s.metrics_port is not None and self.metrics.port is None:
            port = self.metrics.serve(self.s.metrics_port)
            log.info("Prometheus metrics on port %d", port)
        settings = self.s.etcd
        if self.s.standalone:
            from resilient.etcd.server import EmbeddedEtcd

            from resilient.etcd.server import EtcdServerConfig

            self.etcd_server = EmbeddedEtcd(EtcdServerConfig(heartbeat_ms=50, election_ms=500))
            settings = EtcdSettings(endpoints=self.etcd_server.endpoints,
                                    connect_timeout=self.s.timeouts.connect_timeout,
                                    request_deadline=self.s.timeouts.request_deadline)
            log.info("standalone: embedded etcd at %s", ",".join(self.etcd_server.endpoints))
        self.kv = EtcdKV.connect(settings)

    def start(self) -> None:
        logs.set_identity(job=self.s.job_id, node=self.s.node_id)
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        reclaim_stale_run_dirs(shm)
        self.run_dir = tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-", dir=shm)
        _ensure_importable()
        base_env = dict(os.environ)
        base_env.setdefault("OMP_NUM_THREADS", "1")
        if self.s.zygote and not self.s.no_python:
            self.zygote = ZygoteClient(base_env)
        self.supervisor = Supervisor(target=self.s.script, args=list(self.s.script_args), module=self.s.run_module,
                                     no_python=self.s.no_python, zygote=self.zygote, tee=self.s.stream_tee,
                                     standby=self.s.standby, on_dying=self._wake.set)
        self.store = StoreHost(timeout=self.s.timeouts.join_timeout)
        from resilient.rendezvous import NodeInfo, Rendezvous, RendezvousSettings

        addr = self.s.advertise_addr
        node = NodeInfo(node_id=self.s.node_id, host=addr, addr=f"{addr}:0", bulk_addr=f"{addr}:0",
                        slots=self.s.nproc_per_node, store_port=self.store.port)
        self.snapshots, node = self._make_snapshots(node)
        service = WorkerService(self.hub, lambda: self.snapshots, on_register=self._on_register,
                                on_stall=self.metrics.snapshot_stall.observe)
        self.server = serve(service, os.path.join(self.run_dir, "agent.sock"), max_workers=2 * self.s.nproc_per_node + 4)
        rsettings = RendezvousSettings.from_timeouts(self.s.nodes, self.s.timeouts, self.s.max_restarts,
                                                     self.s.restart_window)
        self.rdzv = Rendezvous(self.kv, self.s.job_id, node, rsettings)
        if self.s.persist_dir:
            from resilient.agent.durable import Durable

            self.durable = Durable(self.s.persist_dir, self.s.job_id, self.s.keep, self.s.persist_every)
        events.emit("agent.start", node=self.s.node_id, addr=self.s.advertise_addr, nproc=self.s.nproc_per_node,
                    metrics_port=self.metrics.port,
                    script=self.s.script)

    def _make_snapshots(self, node):
        """One node (``--standalone`` or MAX 1): local commits. Else the ShardManager, which replicates to
        peers and commits job-wide; it binds its peer and bulk ports first, and the node announces them."""
        if self.s.standalone or self.s.nodes.max_nodes == 1:
            snaps = LocalSnapshots(job=self.s.job_id, node=self.s.node_id)
            snaps.start()
            snaps.on_commit = self._on_commit
            return snaps, node
        import dataclasses

        from resilient.replication.manager import ShardManager

        manager = ShardManager(self.kv, self.keys, node, replicas=self.s.replicas, token=_job_token(self.s.job_id),
                               rendezvous=_LazyRendezvous(self))
        manager.start()
        node = dataclasses.replace(node, addr=manager.peer_address, bulk_addr=manager.bulk_address)
        manager.node = node
        return _ShardManagerAdapter(manager, self), node

    def _on_commit(self, step: int, generation: int) -> None:
        self.metrics.committed_step.set(step)
        for h in list(self.handles.values()):
            if h.alive:
                h.control.set("committed_step", step)

    def _on_register(self, slot: int, pid: int) -> None:
        h = self.handles.get(slot)
        if h is not None and h.pid == pid:
            h.registered = True
            # start (fork or spawn) to the worker's first call from user code (the decorator registers)
            self.metrics.spawn_seconds.labels(h.how).set(max(0.0, time.monotonic() - h.started_mono))

    def _replication_bytes(self) -> None:
        """Feed ``resilient_replication_bytes`` from the shard manager's counter and
        ``resilient_snapshot_host_bytes`` from its segments (multi-node only)."""
        manager = getattr(self.snapshots, "manager", None)
        stats = getattr(manager, "stats", None)
        sent = getattr(stats, "sent_bytes", None)
        if sent is None:
            return
        if sent > self._sent_bytes:
            self.metrics.replication_bytes.inc(sent - self._sent_bytes)
        self._sent_bytes = sent
        self.metrics.snapshot_host_bytes.set(manager.host_memory_bytes())

    # ------------------------------------------------------------------------------------------------
    # main loop
    # ------------------------------------------------------------------------------------------------
    def run(self) -> int:
        outcome = "failed"
        code = EXIT_FAILED
        refused: ConfigError | None = None
        try:
            self._install_signals()
            self._form_generation("start", detected_at=None)
            code, outcome = self._supervise()
        except _Exit as e:
            code, outcome = e.code, e.outcome
        except RestartBudgetExceededError as exc:
            code, outcome = EXIT_FAILED, f"failed: {exc}"
            self._close_job("failed", str(exc))
        except RendezvousError as exc:
            code, outcome = EXIT_FAILED, f"failed: {exc}"
        except PersistError as exc:  # e.g. every committed durable checkpoint is damaged: nothing may train
            code, outcome = EXIT_FAILED, f"failed: {exc}"
            self._close_job("failed", str(exc))
        except ConfigError as exc:  # refused after start-up: the job id is a closed job's
            code, outcome, refused = EXIT_USAGE, f"refused: {exc}", exc
        finally:
            self._stop_all(self.s.timeouts.term_grace)
        events.emit("agent.exit", code=code, reason=outcome)
        if refused is not None:
            raise refused  # resilient-run says it like every refusal: one message, no summary (run.py)
        print(summary.render(job=self.s.job_id, node=self.s.node_id, exit_code=code, outcome=outcome,
                             first=self.first_failure, restarts=self.restarts,
                             generation=self.assignment.generation if self.assignment else None,
                             committed_step=self.snapshots.committed_step() if self.snapshots else None,
                             durable=self.durable.summary_line() if self.durable is not None else None),
              flush=True)
        return code

    def _supervise(self) -> tuple[int, str]:
        interval = self.s.timeouts.monitor_interval
        while True:
            if self._preempt:
                return self._preempted()
            rnd = self._take_round()
            if rnd is not None:
                self._on_round(rnd)
                continue
            self._poll_exits()
            if self._round is not None:
                continue
            self._check_hangs()
            self._check_leaving()
            self._track_progress()
            ended = self._ended()
            if ended is not None:
                return ended
            self._wake.wait(interval)

    def _ended(self) -> tuple[int, str] | None:
        """The agent's exit once none of this node's workers runs: succeeded when all finished; the closed
        job's outcome when some failed and no generation will restart them (the rest of the job finished
        while this node was cut off, say); None while a worker runs or a generation may still form."""
        if not self.handles or any(h.alive for h in self.handles.values()):
            return None
        if len(self.finished) == len(self.handles):
            return self._succeeded()
        return self._closed_exit(*self._closed) if self._closed is not None else None

    def _install_signals(self) -> None:
        # Handlers only set a flag and wake the loop: no logging or locks here (the main thread may hold the
        # very lock a handler would take; see waker.py). The loop logs when it acts on the flag.
        def on_term(signum, _frame):
            if self._preempt and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._preempt = signal.Signals(signum).name
            self._wake.set()

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        # a worker's death wakes the monitor loop at once instead of at its next tick
        signal.signal(signal.SIGCHLD, lambda _s, _f: self._wake.set())

    # --- rounds --------------------------------------------------------------------------------------
    def _watch_cb(self, generation: int):
        def cb(reason: str) -> None:
            with self._round_lock:
                if self._round is None or self._round.generation < generation:
                    self._round = _Round(generation, reason, time.monotonic())
            events.emit("rdzv.round", reason=reason, gen=generation)
            self._announce_pending(generation, failed=member_failed(reason))
            self._wake.set()

        return cb

    def _round_pending(self, generation: int) -> bool:
        """Whether ``generation`` (or a later one) was seen ending and the loop has not taken that up yet."""
        with self._round_lock:
            return self._round is not None and self._round.generation >= generation

    def _take_round(self) -> _Round | None:
        with self._round_lock:
            rnd, self._round = self._round, None
        if rnd is not None and self.assignment is not None and rnd.generation < self.assignment.generation:
            return None
        return rnd

    def _announce_pending(self, generation: int, *, failed: bool) -> None:
        """Tell the workers a new generation is coming: they stop at the next step boundary, and their
        collectives of the old one fail now. Workers not registered yet too: one still starting reads the
        target before it forms its group (a worker spawned for a generation that ended during the hand-off
        otherwise waited for peers that had left, for the whole group timeout). ``failed``: a member of
        ``generation`` failed, so none of its snapshots can commit: a snapshot copy in flight stops."""
        for h in list(self.handles.values()):
            if h.alive:
                if failed:
                    h.control.mark_failed(generation)
                h.control.raise_target(generation + 1)

    def _on_round(self, rnd: _Round) -> None:
        log.info("generation %s ends: %s", self.assignment.generation if self.assignment else "-", rnd.reason)
        if rnd.reason == "closed":
            self._on_closed()
            return
        self._form_generation(rnd.reason, detected_at=rnd.at)

    def _on_closed(self) -> None:
        status, reason = self._closed_status()
        self._job_closed(status, reason)
        if status == "failed":
            raise _Exit(EXIT_FAILED, f"failed: the job was closed as failed by another node ({reason})")
        if status == "succeeded":
            # a worker that never reached its step loop joined a generation as the job ended (this node
            # rejoined just then): its peers are gone, so it would wait in its process group's set-up for ever
            late = [h for h in self.handles.values() if h.alive and h.control.get("beats") == 0]
            if late:
                log.info("the job finished before rank(s) %s of this node took part in it; stopping them",
                         sorted(h.rank for h in late))
                self.supervisor.stop(late, self.s.timeouts.term_grace)
        log.info("the job was closed as %s; waiting for this node's workers to finish", status)

    def _job_closed(self, status: str, reason: str) -> None:
        """No generation will form any more: workers waiting for one are told, and the monitor loop ends once
        none of this node's workers runs (``_closed_exit``)."""
        self._closed = (status, reason)
        self.hub.close(f"job {status}: {reason}")

    @staticmethod
    def _closed_exit(status: str, reason: str) -> tuple[int, str]:
        return EXIT_OK if status == "succeeded" else EXIT_FAILED, f"job closed ({status}: {reason})"

    def _closed_before_joining(self, status: str, reason: str) -> str:
        endpoints = ",".join(self.s.etcd.endpoints) if self.s.etcd is not None else "HOST:PORT"
        return (f"job {self.s.job_id!r} was already closed ({status}: {reason}) before this node joined; a job id "
                f"cannot be reused: pass a new --rdzv-id, or delete the old job's keys with "
                f"`etcdctl --endpoints {endpoints} del --prefix {self.keys.prefix}`.")

    def _closed_status(self) -> tuple[str, str]:
        try:
            kv = self.kv.get(self.keys.closed)
        except EtcdError as exc:
            return "unknown", f"could not read the close record: {exc}"
        if kv is None:
            return "unknown", "no close record"
        try:
            d = json.loads(kv.value)
            return str(d.get("status")), str(d.get("reason"))
        except ValueError:
            return "unknown", repr(kv.value[:100])

    def _form_generation(self, reason: str, detected_at: float | None) -> None:
        t0 = time.monotonic()
        prev = self.assignment.generation if self.assignment else None
        if prev is not None:
            self._announce_pending(prev, failed=member_failed(reason))
        try:
            a = self.rdzv.join()
        except RendezvousClosedError as exc:
            status, why = self._closed_status()
            if self.assignment is None:
                # closed before this node ever took part: a finished job's id reused, not this node's outcome
                self._leave()
                raise ConfigError(self._closed_before_joining(status, why)) from exc
            self._job_closed(status, why)
            if status in ("succeeded", "done") and any(h.alive for h in self.handles.values()):
                log.info("the job finished elsewhere; letting this node's workers finish")
                return
            raise _Exit(*self._closed_exit(status, why)) from exc
        t_joined = time.monotonic()
        entry = a.entry(self.s.node_id)
        if entry is None:
            raise RendezvousError(f"generation {a.generation} does not include node {self.s.node_id}")
        self.assignment = a
        logs.set_identity(gen=a.generation)
        # watched from here on: a generation that ends while this node sets it up (its master gone before
        # publishing its store, say) is left at once rather than waited on
        self.rdzv.watch(self._watch_cb(a.generation))
        if entry.group_rank == 0:
            env_port = self.store.host_generation(a.generation)
        else:
            self.store.drop_generation()
            env_port = generation_env_port(a.master_addr, a.master_port, a.generation, self.s.timeouts.join_timeout,
                                           ended=lambda: self._round_pending(a.generation))
            if env_port is None:
                log.info("generation %d ended before its master's store could be read; moving on", a.generation)
                return
        if prev is not None:
            self.restart_count += 1
        wa = {
            slot: WorkerAssignment(
                generation=a.generation, rank=rank, local_rank=slot, world_size=a.world_size,
                local_world_size=len(entry.ranks), group_rank=entry.group_rank, master_addr=a.master_addr,
                master_port=a.master_port, restart_count=self.restart_count, job_id=self.s.job_id,
                node_id=self.s.node_id,
            )
            for slot, rank in enumerate(entry.ranks)
        }
        self.worker_assignments = wa
        self.snapshots.on_generation(tuple(entry.ranks), a.world_size, generation=a.generation)
        if prev is None and self.durable is not None and self.snapshots.committed_step() is None:
            self.durable.seed(self.snapshots, tuple(entry.ranks), a.world_size)
        self.hub.publish(a.generation, wa)
        self.finished.clear()
        kept, respawned, restarted = [], [], []
        now_ns = time.monotonic_ns()
        for slot, w in wa.items():
            h = self.handles.get(slot)
            if h is not None and h.alive and h.registered and h.poll() is None:
                h.generation, h.rank, h.generation_handed_ns = a.generation, w.rank, now_ns
                h.control.set_target(a.generation)
                kept.append(w.rank)
                continue
            if h is not None and h.poll() is None:
                self.supervisor.stop([h], self.s.timeouts.term_grace)
                restarted.append(w.rank)
            elif h is not None:
                respawned.append(w.rank)
            self._spawn(slot, w, env_port)
        for slot in [s for s in self.handles if s not in wa]:
            self.supervisor.stop([self.handles.pop(slot)], self.s.timeouts.term_grace)
        t_done = time.monotonic()
        self.metrics.generation.set(a.generation)
        self.metrics.world_size.set(a.world_size)
        self.metrics.recovery.labels("rendezvous").set(t_joined - t0)
        if detected_at is not None:
            self.metrics.recovery.labels("detect").set(max(0.0, t0 - detected_at))
            self._first_step_pending = (detected_at, a.generation)
        events.emit("gen.formed", gen=a.generation, world_size=a.world_size, nodes=list(a.node_ids), reason=reason,
                    rendezvous_s=t_joined - t0, handoff_s=t_done - t_joined, in_process=kept, respawned=respawned,
                    restarted=restarted)
        log.info("generation %d formed (%s): world size %d, ranks %s; in-process %s, respawned %s, restarted %s; "
                 "rendezvous %.3fs", a.generation, reason, a.world_size, list(entry.ranks), kept, respawned,
                 restarted, t_joined - t0)

    # --- workers --------------------------------------------------------------------------------------
    def _spawn(self, slot: int, w: WorkerAssignment, env_port: int) -> None:
        self._attempt += 1
        old = self.handles.get(slot)
        if old is not None:
            old.control.unlink()
            self.hub.forget(slot)
        control_path = os.path.join(self.run_dir, f"control-{slot}-{self._attempt}")
        control = ControlBlock.create(control_path, w.generation)
        committed = self.snapshots.committed_step()
        control.set("committed_step", -1 if committed is None else committed)
        attempt_dir = self._attempt_dir(slot, w.restart_count)
        error_file = os.path.join(attempt_dir, "error.json")
        out_on, err_on = self.s.stream_redirect
        paths = AgentPaths(agent_socket=os.path.join(self.run_dir, "agent.sock"), control_file=control_path,
                           error_file=error_file, event_log=self.s.event_log or events.path())
        env_w = WorkerAssignment(**{**w.__dict__, "master_port": env_port})
        env_vars = worker_environment(os.environ, env_w, group_world_size=len(self.assignment.nodes),
                                      max_restarts=self.s.max_restarts, snapshot_every=self.s.snapshot_every,
                                      paths=paths, role=self.s.role)
        if self.zygote is not None and not self.zygote.usable():
            self.zygote.wait_ready(ZYGOTE_READY_TIMEOUT)
        self.handles[slot] = self.supervisor.start(
            slot=slot, rank=w.rank, generation=w.generation, env_vars=env_vars, control=control, error_file=error_file,
            stdout_path=os.path.join(attempt_dir, "stdout.log") if out_on else None,
            stderr_path=os.path.join(attempt_dir, "stderr.log") if err_on else None,
        )
        self.metrics.workers_alive.set(sum(1 for h in self.handles.values() if h.alive))

    def _attempt_dir(self, slot: int, restart_count: int) -> str:
        if self.s.log_dir:
            return os.path.join(self.s.log_dir, self.s.job_id, self.s.node_id, f"attempt_{restart_count}", str(slot))
        return os.path.join(self.run_dir, "errors", f"attempt_{self._attempt}", str(slot))

    def _poll_exits(self) -> None:
        self.supervisor.reap()
        for slot, h in list(self.handles.items()):
            if h.exitcode is not None or h.poll() is None:
                continue
            self._on_exit(slot, h)
        self.metrics.workers_alive.set(sum(1 for h in self.handles.values() if h.alive))

    def _on_exit(self, slot: int, h: WorkerHandle) -> None:
        code = h.exitcode
        sig = -code if code is not None and code < 0 else None
        events.emit("worker.exit", rank=h.rank, pid=h.pid, exitcode=code, signal=sig, stopping=h.stopping,
                    reaped=h.reaped)
        if h.stopping:
            return
        if code == 0:
            log.info("rank %d (pid %d) finished", h.rank, h.pid)
            self.finished.add(slot)
            self.metrics.worker_exits.labels("ok").inc()
            return
        self.metrics.worker_exits.labels("failed").inc()
        gen = self.assignment.generation
        failure = summary.Failure(rank=h.rank, local_rank=slot, node=self.s.node_id, pid=h.pid, exitcode=code,
                                  generation=gen, when=time.time(), error_file=h.error_file, killed_for=h.killed_for)
        with self._round_lock:
            collateral = self._round is not None or gen in self._fault_gens
        if collateral:
            log.warning("rank %d (pid %d) exited with %s after generation %d already ended; it is restarted with "
                        "the next generation", h.rank, h.pid, describe_exit(code), gen)
            if self.first_failure is None:
                self.first_failure = failure
            return
        self.first_failure = self.first_failure or failure
        log.error("rank %d (pid %d) failed: %s%s", h.rank, h.pid, describe_exit(code),
                  "" if h.reaped else " (seen as its exit began; the kernel is still tearing it down)")
        detected = time.monotonic()
        self._fault_gens.add(gen)
        try:
            self.rdzv.publish_fault(gen, "worker.exit", {"rank": h.rank, "exitcode": code, "pid": h.pid,
                                                         "hung": h.killed_for == "hung",
                                                         "stuck": h.killed_for == "stuck"})
        except FencedError as exc:
            # The job moved past this generation without this node (its lease expired while it was
            # paused, or the job closed): no peer starts a round for this worker, so this node rejoins.
            # join() brings it into the newest generation, or reports the job closed and the agent exits.
            log.info("the fault of generation %d was not published: the job moved on (%s); rejoining", gen, exc)
            with self._round_lock:
                if self._round is None:
                    self._round = _Round(gen, f"fenced:{self.s.node_id}", detected)
            self._wake.set()
            return
        except EtcdError as exc:
            log.warning("could not publish the fault of generation %d (%s); recovering anyway", gen, exc)
        reason = f"rank {h.rank} on node {self.s.node_id}: {failure.cause()}"
        try:
            self.restarts = self.rdzv.consume_restart(reason)
            self.metrics.restarts.inc()
        except RestartBudgetExceededError as exc:
            self._close_job("failed", f"restart budget spent; last failure: {reason}")
            raise _Exit(EXIT_FAILED, f"failed: {exc}") from exc
        except EtcdUnavailableError as exc:
            # cut off from etcd (a partition, say): no generation forms without it either, so nothing restarts
            # uncounted while it lasts; the next generation is joined once etcd answers again
            log.warning("could not charge the restart for generation %d (%s); recovering anyway, uncharged",
                        gen, exc)
        self._announce_pending(gen, failed=True)
        with self._round_lock:
            if self._round is None:
                self._round = _Round(gen, f"fault:{self.s.node_id}", detected)
        self._wake.set()

    def _check_hangs(self) -> None:
        """Kill at most one hung worker per check: the most suspicious one (stopped or spinning before one
        blocked in a collective, then the oldest beat). Its peers then fail their collective and recover."""
        if self.s.hang_timeout is None:
            return
        now = time.monotonic_ns()
        hung = []
        for h in list(self.handles.values()):
            if not h.alive or h.killed_for is not None:
                continue
            c = h.control
            verdict = hang.decide(now_ns=now, beats=c.get("beats"), beat_mono_ns=c.get("beat_mono_ns"),
                                  state=c.state(), generation_handed_ns=h.generation_handed_ns,
                                  hang_timeout=self.s.hang_timeout, round_pending=self._round is not None)
            if verdict.hung:
                hung.append((hang.suspicion(_proc_state(h.pid)), -verdict.beat_age_s, h.slot, h, verdict))
        if not hung:
            return
        *_, h, verdict = min(hung, key=lambda t: t[:3])
        log.error("rank %d (pid %d) made no progress for %.1fs (hang timeout %.1fs): dumping stacks, then SIGKILL",
                  h.rank, h.pid, verdict.beat_age_s, self.s.hang_timeout)
        events.emit("worker.hang", rank=h.rank, pid=h.pid, beat_age=verdict.beat_age_s)
        self.metrics.hangs.inc()
        self._dump_and_kill([h], "hung")

    def _check_leaving(self) -> None:
        """Kill every worker still running a generation ``leave_timeout`` seconds (of this agent's checks) after
        it was told the next one is coming: nothing reaches where it is stuck (a CUDA synchronisation on a
        NCCL collective whose peer is gone), and its peers wait for it in the next generation. Its exit then
        starts a round like a crash's."""
        if self.s.leave_timeout is None:
            return
        now = time.monotonic_ns()
        cap = max(1.0, 10 * self.s.timeouts.monitor_interval)
        stuck = []
        for h in self.handles.values():
            if not h.alive or h.killed_for is not None:
                continue
            c = h.control
            gen, target = c.get("generation"), c.get("target_generation")
            must = hang.must_leave(state=c.state(), beats=c.get("beats"), generation=gen, target=target)
            waited = h.leave_clock.tick(now, must, gap_cap_s=cap)
            if must and waited > self.s.leave_timeout:
                stuck.append(h)
                log.error("rank %d (pid %d) still runs generation %d %.1fs after generation %d was announced "
                          "(leave timeout %.1fs): stuck where the announcement cannot reach it; dumping stacks, "
                          "then SIGKILL", h.rank, h.pid, gen, waited, target, self.s.leave_timeout)
                events.emit("worker.stuck", rank=h.rank, pid=h.pid, stuck_gen=gen, target=target, waited_s=waited)
                self.metrics.stuck.inc()
        self._dump_and_kill(stuck, "stuck")

    def _dump_and_kill(self, handles: list[WorkerHandle], why: str) -> None:
        """Dump the stacks of ``handles`` to the log, then SIGKILL them, noting ``why`` (the summary's cause).
        Workers that write their own dump (faulthandler) get one shared moment for it, however many."""
        if not handles:
            return
        writing_own = [self.supervisor.dump_stacks(h, what=why) for h in handles]
        if any(writing_own):
            time.sleep(self.supervisor.DUMP_WAIT_S)
        for h in handles:
            h.killed_for = why
            self.supervisor.kill(h)

    def _persist(self, final: bool) -> None:
        if self.durable is None or self.assignment is None:
            return
        entry = self.assignment.entry(self.s.node_id)
        self.durable.maybe_persist(self.snapshots, tuple(entry.ranks) if entry else (), self.assignment.world_size,
                                   self.assignment.generation, final=final)

    def _track_progress(self) -> None:
        self._persist(final=False)
        self._replication_bytes()
        committed = self.snapshots.committed_step()
        if committed is not None and committed != self._last_committed:
            self._last_committed = committed
            self._on_commit(committed, self.assignment.generation)
            # the workers run and commit: a warm standby, sized like them, replaces the next one to fail
            live = [h for h in self.handles.values() if h.alive]
            if live and self._round is None:
                self.supervisor.keep_standby(max(anon_bytes_of(h.pid) for h in live))
        steps = [h.control.get("last_step") for h in self.handles.values() if h.alive]
        if not steps:
            return
        step = min(steps)
        if step > self._last_progress:
            self._last_progress = step
            try:
                self.rdzv.report_progress(step, wait=False)  # the monitor loop never waits on etcd
            except EtcdError as exc:
                log.debug("progress report failed: %s", exc)
        if self._first_step_pending is not None:
            detected_at, gen = self._first_step_pending
            live = [h for h in self.handles.values() if h.alive]
            if live and all(h.control.get("generation") >= gen and h.control.get("beat_mono_ns") >
                            h.generation_handed_ns for h in live):
                total = time.monotonic() - detected_at
                self.metrics.recovery_total.observe(total)
                self.metrics.recovery.labels("first_step").set(total)
                self._first_step_pending = None

    # --- endings --------------------------------------------------------------------------------------
    def _succeeded(self) -> tuple[int, str]:
        self._persist(final=True)
        self._close_job("succeeded", f"every worker of node {self.s.node_id} finished")
        self._leave()
        return EXIT_OK, "succeeded"

    def _preempted(self) -> tuple[int, str]:
        log.warning("received %s: stopping this node's workers after their current step", self._preempt)
        events.emit("agent.preempted", node=self.s.node_id)
        registered = [h for h in self.handles.values() if h.alive and h.registered]
        others = [h for h in self.handles.values() if h.alive and not h.registered]
        for h in registered:
            h.control.set("stop_requested", 1)
        if others:
            self.supervisor.stop(others, self.s.timeouts.term_grace)
        deadline = time.monotonic() + self.s.preempt_grace
        while any(h.poll() is None for h in registered) and time.monotonic() < deadline:
            time.sleep(0.02)
        late = [h for h in registered if h.poll() is None]
        if late:
            log.warning("%d worker(s) did not stop within %.0fs after the preemption request: stopping them",
                        len(late), self.s.preempt_grace)
            self.supervisor.stop(late, self.s.timeouts.term_grace)
        for h in registered:
            h.stopping = True
        self._persist(final=True)
        committed = self.snapshots.committed_step()
        log.info("preempted: workers stopped; committed step %s; leaving the job", committed)
        self._leave()
        return EXIT_OK, f"preempted (SIGTERM): left the job cleanly at committed step {committed}"

    def _close_job(self, status: str, reason: str) -> None:
        if self.rdzv is None:
            return
        try:
            self.rdzv.close_job(status, reason)
        except EtcdError as exc:
            log.warning("could not record the job as %s in etcd: %s", status, exc)
        self.hub.close(f"job {status}: {reason}")

    def _leave(self) -> None:
        try:
            self.rdzv.leave()
        except EtcdError as exc:
            log.warning("could not leave the rendezvous cleanly: %s", exc)

    def _stop_all(self, grace: float) -> None:
        live = [h for h in self.handles.values() if h.poll() is None]
        if live and self.supervisor is not None:
            self.supervisor.stop(live, grace)

    def close(self) -> None:
        """Release everything this agent started (idempotent)."""
        self._stop_all(self.s.timeouts.term_grace)
        if self.supervisor is not None:
            self.supervisor.close()
        if self.server is not None:
            self.server.stop(grace=None)
            self.server = None
        if self.zygote is not None:
            self.zygote.close()
            self.zygote = None
        for h in self.handles.values():
            h.control.unlink()
        if self.durable is not None:
            self.durable.close()
            self.durable = None
        if self.snapshots is not None:
            self.snapshots.close(unlink=True)
            self.snapshots = None
        if self.store is not None:
            self.store.close()
            self.store = None
        self.metrics.close()
        if self.kv is not None:
            self.kv.close()
            self.kv = None
        if self.etcd_server is not None:
            self.etcd_server.close()
            self.etcd_server = None
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = ""

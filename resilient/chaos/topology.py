"""The system under test as the harness runs it: an etcd (1 or 3 members) and hosts, each host one
``resilient-run`` agent with its workers, on loopback or each in its own network namespace.

``Cluster`` starts and owns all of it and registers every piece with the run's ``Teardown``. A host's
processes are found from its agent's process tree and from the ``worker.start`` events of its node, so
faults can target "the agent of h1" or "a worker of h1" by what the runtime itself reported.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from resilient import env
from resilient.chaos import netns as netns_mod
from resilient.chaos.eventlog import Event, host_of
from resilient.chaos.proxy import TcpProxy
from resilient.chaos.scenario import HostSpec, Scenario
from resilient.chaos.teardown import Teardown, descendants
from resilient.errors import ChaosError
from resilient.etcd.server import EmbeddedCluster, EmbeddedEtcd, EtcdServerConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SCRIPT = REPO_ROOT / "chaos" / "train_chaos.py"
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "resilient"
AGENT_DIR_PREFIX = "rsl-agent-"  # resilient.agent.agent.RUN_DIR_PREFIX (not imported: keep the harness light)


def shm_segments(directory: Path) -> set[str]:
    """Segment files in one directory (a host's private shm directory)."""
    try:
        return {p.name for p in directory.iterdir() if p.name.startswith(SHM_PREFIX) and p.is_file()}
    except FileNotFoundError:
        return set()


@dataclass
class Host:
    spec: HostSpec
    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None
    starts: int = 0
    ip: str = "127.0.0.1"
    etcd_proxy: list[TcpProxy] = field(default_factory=list)
    lost: bool = False
    agent_pids: list[int] = field(default_factory=list)  # every agent this run started for the host

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def processes(self) -> list[psutil.Process]:
        """The agent and every descendant (workers, zygote), alive now."""
        return descendants([self.proc.pid]) if self.running() and self.proc else []


class Cluster:
    def __init__(self, scenario: Scenario, run_dir: Path, teardown: Teardown, *, script: Path,
                 script_args: list[str], failpoints: dict[str, str], inworker: dict[str, str],
                 job: str) -> None:
        self.scenario = scenario
        self.run_dir = run_dir
        self.teardown = teardown
        self.script = script
        self.script_args = script_args
        self.failpoints = failpoints  # host -> RESILIENT_FAILPOINTS spec
        self.inworker = inworker  # host -> RESILIENT_CHAOS_INWORKER spec
        self.job = job
        self.events_dir = run_dir / "events"
        self.events_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "logs").mkdir(exist_ok=True)
        self.ctl_dir = run_dir / "ctl"
        self.ctl_dir.mkdir(exist_ok=True)
        self.etcd: EmbeddedEtcd | EmbeddedCluster | None = None
        self.network: netns_mod.Network | None = None
        self.hosts: dict[str, Host] = {}
        self.proxied: set[str] = set()
        self.persist_dir: Path | None = None
        self.persist_mounted = False
        self.worker_pids: dict[int, dict[str, Any]] = {}  # pid -> worker.start event
        # Each host keeps its segments in a directory of its own (RESILIENT_SHM_DIR), created and removed by
        # this run: "a host's shared memory" is exactly that directory, and nothing else in /dev/shm is touched.
        self.shm_root = SHM_DIR / f"rs-chaos-{job}"
        self.shm_root.mkdir(parents=True, exist_ok=False)
        teardown.add(f"shm directory {self.shm_root}", lambda: shutil.rmtree(self.shm_root, ignore_errors=True))

    def shm_dir(self, host: str) -> Path:
        return self.shm_root / host

    # --- etcd -------------------------------------------------------------------------------------------
    def start_etcd(self) -> None:
        (self.run_dir / "etcd").mkdir(exist_ok=True)
        cfg = EtcdServerConfig(heartbeat_ms=50, election_ms=500, unsafe_no_fsync=True, log_level="error",
                               base_dir=str(self.run_dir / "etcd"))
        if self.scenario.topology.etcd_members == 1:
            self.etcd = EmbeddedEtcd(cfg)
        else:
            self.etcd = EmbeddedCluster(self.scenario.topology.etcd_members, cfg)
        self.teardown.add("etcd", self.etcd.close)

    @property
    def etcd_endpoints(self) -> list[str]:
        assert self.etcd is not None
        return list(self.etcd.endpoints)

    # --- network ----------------------------------------------------------------------------------------
    def start_network(self, tag: str) -> None:
        if self.scenario.topology.network != "netns":
            return
        self.network = netns_mod.Network(tag, os.getpid() % 250)
        self.teardown.add("network namespaces", self._close_network)
        for h in self.scenario.topology.hosts:
            self.network.add_host(h.name)

    def _close_network(self) -> None:
        if self.network is not None:
            problems = self.network.close()
            if problems:
                raise ChaosError("; ".join(problems))

    def proxy_etcd_for(self, host: str) -> None:
        """Route a host's etcd traffic through proxies of its own (for slow links and netns hosts)."""
        self.proxied.add(host)

    # --- persistence directory ---------------------------------------------------------------------------
    def make_persist_dir(self) -> Path | None:
        rt = self.scenario.runtime
        if not rt.persist_every:
            return None
        d = self.run_dir / "persist"
        d.mkdir(exist_ok=True)
        if rt.persist_tmpfs_kb:
            res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={rt.persist_tmpfs_kb}k", "rs-chaos", str(d)],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                raise ChaosError(f"Cannot mount a {rt.persist_tmpfs_kb} KiB tmpfs on {d}: {res.stderr.strip()}.")
            self.persist_mounted = True
            self.teardown.add(f"tmpfs {d}", lambda: _umount(d))
        self.persist_dir = d
        return d

    # --- hosts ------------------------------------------------------------------------------------------
    def _host_endpoints(self, name: str) -> list[str]:
        if name not in self.proxied and self.network is None:
            return self.etcd_endpoints
        host = self.hosts[name]
        if not host.etcd_proxy:
            bind = self.network.gateway if self.network else "127.0.0.1"
            for ep in self.etcd_endpoints:
                h, _, p = ep.rpartition(":")
                proxy = TcpProxy((bind, 0), (h, int(p)))
                host.etcd_proxy.append(proxy)
                self.teardown.add(f"etcd proxy {proxy.endpoint}", proxy.close)
        return [p.endpoint for p in host.etcd_proxy]

    def build_host(self, spec: HostSpec) -> Host:
        sc = self.scenario
        rt = sc.runtime
        events = self.events_dir / f"{spec.name}.jsonl"
        host = Host(spec=spec, cmd=[], env={}, log_path=self.run_dir / "logs" / f"{spec.name}.out")
        self.hosts[spec.name] = host
        if self.network:
            host.ip = self.network.hosts[spec.name].ip
        else:
            # Each loopback host gets an address of its own in 127/8: the runtime tells hosts apart by their
            # advertised address (replica placement puts copies on distinct hosts), so one shared 127.0.0.1
            # would make the whole cluster one host holding one copy of everything.
            idx = [h.name for h in self.scenario.topology.hosts].index(spec.name)
            host.ip = f"127.0.0.{idx + 1}"
        cmd = [
            sys.executable, "-m", "resilient.run",
            "--nnodes", f"{rt.min_nodes}:{len(sc.topology.hosts)}",
            "--nproc-per-node", str(spec.workers),
            "--rdzv-endpoint", ",".join(self._host_endpoints(spec.name)),
            "--rdzv-id", self.job,
            "--max-restarts", str(rt.max_restarts),
            "--monitor-interval", f"{rt.monitor_interval:g}",
            "--lease-ttl", str(rt.lease_ttl),
            "--hang-timeout", f"{rt.hang_timeout:g}",
            "--leave-timeout", f"{rt.leave_timeout:g}",
            "--replicas", str(rt.replicas),
            "--snapshot-every", str(rt.snapshot_every),
            "--last-call", f"{rt.last_call or 1:g}",
            "--event-log", str(events),
            "--node-id", spec.name,
            "--log-dir", str(self.run_dir / "logs" / spec.name),
        ]
        if self.persist_dir is not None:
            cmd += ["--persist-dir", str(self.persist_dir), "--persist-every", str(rt.persist_every)]
        cmd += ["--local-addr", host.ip]
        cmd += [str(self.script), *self.script_args]
        if self.network is not None:
            cmd = self.network.exec_prefix(spec.name) + cmd
        e = dict(os.environ)
        e.pop(env.FAILPOINTS, None)
        e.update({
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            env.EVENT_LOG: str(events),
            env.CHAOS_DIR: str(self.ctl_dir),
            env.SHM_DIR: str(self.shm_dir(spec.name)),
        })
        self.shm_dir(spec.name).mkdir(exist_ok=True)
        e.pop(env.FAILPOINTS_STATE, None)
        if spec.name in self.failpoints:
            e[env.FAILPOINTS] = self.failpoints[spec.name]
            # N* counts for the whole host (agent and every worker it respawns), not per process
            e[env.FAILPOINTS_STATE] = str(self.ctl_dir / "failpoints" / spec.name)
            (self.ctl_dir / "failpoints" / spec.name).mkdir(parents=True, exist_ok=True)
        if spec.name in self.inworker:
            e[env.CHAOS_INWORKER] = self.inworker[spec.name]
        if self.network is not None:
            e["GLOO_SOCKET_IFNAME"] = netns_mod.IFACE
        host.cmd, host.env = cmd, e
        return host

    def start_host(self, name: str, *, disarm: bool = False) -> Host:
        host = self.hosts.get(name) or self.build_host(self.scenario.topology.host(name))
        if host.running():
            raise ChaosError(f"Host {name} is already running (pid {host.pid}).")
        e = dict(host.env)
        if disarm:  # a restarted host does not re-fire the faults armed in its first life
            e.pop(env.FAILPOINTS, None)
            e.pop(env.CHAOS_INWORKER, None)
        out = open(host.log_path, "ab")
        host.proc = subprocess.Popen(host.cmd, env=e, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, cwd=str(self.run_dir))
        out.close()
        host.starts += 1
        host.lost = False
        host.agent_pids.append(host.proc.pid)
        self.teardown.track_pid(host.proc.pid)
        if host.starts == 1:
            self.teardown.add(f"agent run directories of {name}", lambda: self.remove_agent_dirs(name))
        return host

    def agent_dirs(self, name: str) -> list[Path]:
        """The run directories (control blocks, sockets) that this host's agents created directly in /dev/shm
        (``rsl-agent-<agent pid>-*``): part of the host's shared memory although outside its shm directory."""
        out: list[Path] = []
        for pid in self.hosts[name].agent_pids:
            out += sorted(SHM_DIR.glob(f"{AGENT_DIR_PREFIX}{pid}-*"))
        return out

    def remove_agent_dirs(self, name: str) -> list[str]:
        removed = []
        for d in self.agent_dirs(name):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
        return removed

    def observe(self, events: list[Event]) -> None:
        for ev in events:
            if ev.get("kind") == "worker.start" and isinstance(ev.get("pid"), int):
                pid = ev["pid"]
                self.worker_pids[pid] = ev
                self.teardown.track_pid(pid)

    def workers_of(self, name: str) -> list[tuple[int, dict[str, Any]]]:
        """Alive workers of a host as (pid, worker.start event), lowest rank first."""
        out = []
        for pid, ev in self.worker_pids.items():
            if host_of(ev) != name:
                continue
            try:
                p = psutil.Process(pid)
                if p.status() == psutil.STATUS_ZOMBIE:
                    continue
            except psutil.NoSuchProcess:
                continue
            out.append((pid, ev))
        return sorted(out, key=lambda x: (x[1].get("rank") if isinstance(x[1].get("rank"), int) else 0, x[0]))

    def track_trees(self) -> None:
        """Remember every process now below a running agent (zygote, workers, helpers): one that outlives
        its agent is still this run's, for the census and the teardown."""
        for h in self.hosts.values():
            for p in h.processes():
                self.teardown.track_pid(p.pid)

    def all_pids(self) -> list[int]:
        """Every process this run started or saw below an agent, that still is that process."""
        return self.teardown.ours()

    def signal_host(self, name: str, sig: int) -> list[int]:
        host = self.hosts[name]
        procs = host.processes()
        for pid, _ in self.workers_of(name):
            if all(p.pid != pid for p in procs):
                try:
                    procs.append(psutil.Process(pid))
                except psutil.NoSuchProcess:
                    pass
        sent = []
        for p in procs:
            try:
                p.send_signal(sig)
                sent.append(p.pid)
            except psutil.NoSuchProcess:
                continue
        return sent

    def segments_of(self, name: str, procs: list[psutil.Process] | None = None) -> set[str]:
        """Paths of the segments in a host's shm directory; with ``procs``, only those these processes map."""
        d = self.shm_dir(name)
        if procs is None:
            return {str(d / s) for s in shm_segments(d)}
        found = set()
        for p in procs:
            try:
                for mm in p.memory_maps(grouped=True):
                    if mm.path.startswith(str(d) + "/"):
                        found.add(mm.path)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    def stop_all(self, timeout: float = 10.0) -> None:
        """Ask running agents to stop (SIGTERM), then kill what remains."""
        for h in self.hosts.values():
            if h.running():
                try:
                    os.killpg(h.proc.pid, signal.SIGCONT)
                    h.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for h in self.hosts.values():
            if h.proc is None:
                continue
            try:
                h.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass


def _umount(d: Path) -> None:
    res = subprocess.run(["umount", "-l", str(d)], capture_output=True, text=True)
    if res.returncode != 0:
        raise ChaosError(f"umount {d} failed: {res.stderr.strip()}")

"""``AgentSettings``: everything one node agent is configured with, frozen and validated at construction.

Built from the command line by ``cli_args.parse``; the agent and its parts read only this object (no
argparse namespace, no environment lookups past start-up).
"""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass, field

from resilient.config import EtcdSettings, NodeRange, Timeouts
from resilient.errors import ConfigError

REDIRECT_CHOICES = {"0": 0, "1": 1, "2": 2, "3": 3}


@dataclass(frozen=True)
class AgentSettings:
    """One node agent's configuration. ``redirects``/``tee`` follow torchrun: 0 none, 1 stdout,
    2 stderr, 3 both (per local rank ``<log_dir>/<run_id>/attempt_<n>/<local_rank>/{stdout,stderr}.log``)."""

    script: str
    script_args: tuple[str, ...]
    nodes: NodeRange
    nproc_per_node: int
    job_id: str
    node_id: str
    etcd: EtcdSettings | None  # None with --standalone: the agent starts an embedded etcd
    timeouts: Timeouts
    standalone: bool = False
    max_restarts: int = 3
    restart_window: float = 3600.0
    hang_timeout: float | None = None  # None: hang detection off
    leave_timeout: float | None = 60.0  # None: a worker that does not leave an ended generation is never killed
    replicas: int = 2
    snapshot_every: int = 1
    persist_dir: str | None = None
    persist_every: int = 0  # 0: only on SIGTERM and at job end
    keep: int = 2
    metrics_port: int | None = None
    event_log: str | None = None
    log_dir: str | None = None
    redirects: int = 0
    tee: int = 0
    preempt_grace: float = 60.0
    run_module: bool = False  # -m: script is a module name
    no_python: bool = False  # --no-python: script is an executable
    zygote: bool = True
    standby: bool = True  # keep one warm standby worker forked from the zygote (--no-standby)
    host: str = field(default_factory=socket.gethostname)
    advertise_addr: str = "127.0.0.1"
    role: str = "default"  # --role: the workers' ROLE_NAME

    def __post_init__(self) -> None:
        problems = []
        if self.nproc_per_node < 1:
            problems.append(f"--nproc-per-node must be >= 1, got {self.nproc_per_node}")
        if self.max_restarts < 0:
            problems.append(f"--max-restarts must be >= 0, got {self.max_restarts}")
        if not self.restart_window > 0:
            problems.append(
                f"--restart-window {self.restart_window:g} s must be > 0 (restarts are counted over that many seconds)"
            )
        if self.hang_timeout is not None and self.hang_timeout <= self.timeouts.monitor_interval:
            problems.append(
                f"--hang-timeout {self.hang_timeout:g}s must exceed --monitor-interval "
                f"{self.timeouts.monitor_interval:g}s"
            )
        if self.leave_timeout is not None and self.leave_timeout <= self.timeouts.monitor_interval:
            problems.append(
                f"--leave-timeout {self.leave_timeout:g}s must exceed --monitor-interval "
                f"{self.timeouts.monitor_interval:g}s (0 turns it off)"
            )
        if self.replicas < 1:
            problems.append(f"--replicas must be >= 1, got {self.replicas}")
        if self.snapshot_every < 0:
            problems.append(f"--snapshot-every must be >= 0 (0: off), got {self.snapshot_every}")
        if self.persist_every < 0:
            problems.append(f"--persist-every must be >= 0, got {self.persist_every}")
        if self.keep < 1:
            problems.append(f"--keep must be >= 1, got {self.keep}")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            problems.append(f"--metrics-port {self.metrics_port} is not a TCP port")
        if self.redirects not in REDIRECT_CHOICES.values() or self.tee not in REDIRECT_CHOICES.values():
            problems.append("--redirects and --tee take 0 (none), 1 (stdout), 2 (stderr) or 3 (both)")
        if (self.redirects or self.tee) and not self.log_dir:
            problems.append("--redirects/--tee write per-rank log files: give --log-dir too")
        if self.standalone and self.nodes.max_nodes != 1:
            problems.append(
                f"--standalone runs one node, but --nnodes is {self.nodes.min_nodes}:{self.nodes.max_nodes}; "
                "drop --nnodes, or drop --standalone and pass --rdzv-endpoint for a multi-node job"
            )
        if not self.standalone and self.etcd is None:
            problems.append("no etcd: pass --rdzv-endpoint host:port[,host:port...] or --standalone")
        problems.extend(self._target_problems())
        if not self.role:
            problems.append("--role must not be empty")
        if not self.job_id or "/" in self.job_id:
            problems.append(f"--rdzv-id {self.job_id!r} must be non-empty and contain no '/'")
        if not self.node_id or "/" in self.node_id:
            problems.append(f"--node-id {self.node_id!r} must be non-empty and contain no '/'")
        if self.preempt_grace <= 0:
            problems.append(f"--preempt-grace must be > 0, got {self.preempt_grace:g}")
        if problems:
            raise ConfigError("Invalid resilient-run options: " + "; ".join(problems) + ".")

    def _target_problems(self) -> list[str]:
        """The script must exist (a file), or with --no-python be an executable found as the OS will find it."""
        if self.run_module:
            return []
        if self.no_python:
            if shutil.which(self.script) is not None:
                return []
            if os.path.isdir(self.script):
                return [f"--no-python: {self.script!r} is a directory, not an executable"]
            if os.path.isfile(self.script):
                return [f"--no-python: {self.script!r} is not executable; make it so (chmod +x {self.script}) "
                        "or run it through its interpreter"]
            if os.sep not in self.script:
                return [f"--no-python: executable {self.script!r} is not on PATH; give its path (e.g. "
                        f"./{self.script}) or add its directory to PATH"]
            return [f"--no-python: executable {self.script!r} does not exist (cwd {os.getcwd()!r})"]
        if os.path.isdir(self.script):
            return [f"training script {self.script!r} is a directory; give the Python file to run (or a module "
                    "with -m)"]
        if not os.path.isfile(self.script):
            return [f"training script {self.script!r} does not exist (cwd {os.getcwd()!r})"]
        return []

    @property
    def stream_redirect(self) -> tuple[bool, bool]:
        """(stdout to a file, stderr to a file)."""
        r = self.redirects | self.tee
        return bool(r & 1), bool(r & 2)

    @property
    def stream_tee(self) -> tuple[bool, bool]:
        return bool(self.tee & 1), bool(self.tee & 2)


def _usable_directory(flag: str, path: str) -> str | None:
    """Create ``path`` (and its parents) when missing; a problem naming ``flag`` when it is not a directory
    this process can write into, else None."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{flag} {path!r} is a file, not a directory; give a directory (it is created when missing)"
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        return (f"{flag} {path!r} cannot be created ({exc.strerror or exc}); give a directory this user can "
                "create or write")
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{flag} {path!r} is not writable by this user; give a directory it can write"
    return None


def prepare_local_paths(settings: AgentSettings) -> None:
    """Make the local directories the agent writes into (``--log-dir``; ``--persist-dir`` unless it is a URL,
    which the persister opens through fsspec), before anything is started. Raises ``ConfigError`` naming each
    one that is a file, cannot be created or is not writable."""
    problems = []
    if settings.log_dir:
        problems.append(_usable_directory("--log-dir", settings.log_dir))
    if settings.persist_dir and "://" not in settings.persist_dir:
        problems.append(_usable_directory("--persist-dir", settings.persist_dir))
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError("Invalid resilient-run options: " + "; ".join(problems) + ".")

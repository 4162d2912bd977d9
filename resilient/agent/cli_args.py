"""The ``resilient-run`` command line: torchrun's core flags (same names and meaning) plus resilient's own.

Every torchrun flag is known: supported, accepted and ignored with a warning (``ignored_flags``), or refused
with what to do instead (``UNSUPPORTED_TORCHRUN_FLAGS``). ``parse(argv)`` returns a validated
``AgentSettings`` or raises ``ConfigError``/``SystemExit`` (argparse's usage errors) before anything is
started; messages name the flags as the user wrote them.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
from typing import Sequence

from resilient import env, logs
from resilient.agent.settings import AgentSettings
from resilient.config import EtcdSettings, NodeRange, Timeouts
from resilient.errors import ConfigError

log = logs.get_logger(__name__)

DESCRIPTION = """\
Launch and supervise a PyTorch training script on this node, like torchrun, with fast failure detection
and in-memory recovery. Every node of a job runs one resilient-run with the same --rdzv-endpoint and
--rdzv-id. Workers get torch.distributed's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...), so an
unmodified torchrun script runs as is and is restarted when a worker fails; a script using
@resilient.elastic recovers in-process from in-memory snapshots.
"""

EPILOG = """\
examples:
  resilient-run --standalone --nproc-per-node 2 train.py --lr 3e-4
  resilient-run --nnodes 1:4 --nproc-per-node 8 --rdzv-endpoint etcd1:2379,etcd2:2379 --rdzv-id job42 train.py
exit status: 0 when every worker finished (or the node was preempted with SIGTERM and left cleanly),
1 when the job failed (the summary names the first failure), 2 for invalid options or an unreachable etcd.
"""


def _bool_or_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} must be 0, 1, 2 or 3") from exc
    if n not in (0, 1, 2, 3):
        raise argparse.ArgumentTypeError(f"{value!r} must be 0 (none), 1 (stdout), 2 (stderr) or 3 (both)")
    return n


def _seconds(value: str) -> float:
    """A finite number of seconds (range checks, which name the flag, come later)."""
    try:
        f = float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from exc
    if not math.isfinite(f):
        raise argparse.ArgumentTypeError(f"{value!r} is not a finite number of seconds")
    return f


# torchrun flags (torch 2.13) resilient-run does not support: flag spellings -> (takes a value, what to do).
# Each is refused with its own message instead of argparse's bare "unrecognized arguments".
UNSUPPORTED_TORCHRUN_FLAGS: dict[tuple[str, ...], tuple[bool, str]] = {
    ("--run-path", "--run_path"): (
        False,
        "resilient-run always starts each worker as its own process (forked from a warm zygote, or spawned), "
        "never inside the launcher's interpreter; drop it",
    ),
    ("--local-ranks-filter", "--local_ranks_filter"): (
        True,
        "to keep the console quiet, send the worker streams to per-rank files with --log-dir DIR -r 3 and read "
        "the ranks you want there; drop it",
    ),
    ("--logs-specs", "--logs_specs"): (
        True,
        "per-rank log files are laid out by --log-dir with -r/--redirects or -t/--tee (see docs/configuration.md); "
        "drop it",
    ),
    ("--event-log-handler", "--event_log_handler"): (
        True,
        "resilient-run writes its events as JSON lines to the file given by --event-log FILE; use that instead",
    ),
    ("--duplicate-stdout-filters", "--duplicate_stdout_filters"): (
        True,
        "use -t 1 (or -t 3) with --log-dir DIR: every stdout line goes to the rank's file under DIR and to the "
        "console, and you can filter those files; drop it",
    ),
    ("--duplicate-stderr-filters", "--duplicate_stderr_filters"): (
        True,
        "use -t 2 (or -t 3) with --log-dir DIR: every stderr line goes to the rank's file under DIR and to the "
        "console, and you can filter those files; drop it",
    ),
    ("--numa-binding", "--numa_binding"): (
        True,
        "resilient-run does not bind workers to CPUs; bind in the script (os.sched_setaffinity by LOCAL_RANK) "
        "if you need it, and drop the flag",
    ),
    ("--signals-to-handle", "--signals_to_handle"): (
        True,
        "resilient-run handles SIGTERM and SIGINT itself (preemption: workers finish their step, snapshot and "
        "stop within --preempt-grace); drop it",
    ),
    ("--shutdown-timeout", "--shutdown_timeout"): (
        True,
        "use --term-grace SECONDS, the time between SIGTERM and SIGKILL when a worker is stopped",
    ),
    ("--virtual-local-rank", "--virtual_local_rank"): (
        False,
        "workers get LOCAL_RANK 0..nproc-1 and see every device; pick the device by LOCAL_RANK in the script "
        "(as torchrun does by default) and drop it",
    ),
}

# --rdzv-backend values accepted (torchrun's dynamic backends): resilient uses its own etcd rendezvous for all
ACCEPTED_RDZV_BACKENDS = ("c10d", "etcd", "etcd-v2")
# --rdzv-conf keys resilient reads, by their torchrun names (the ones the ignored-keys warning names)
RDZV_CONF_TORCHRUN_KEYS = ("join_timeout", "last_call_timeout")
# every --rdzv-conf key resilient reads: the torchrun names plus "last_call", resilient's alias of
# last_call_timeout; torchrun's other keys are ignored with a warning
RDZV_CONF_KEYS = RDZV_CONF_TORCHRUN_KEYS + ("last_call",)


class _Unsupported(argparse.Action):
    """A torchrun flag resilient-run refuses: raises ``ConfigError`` with what to do instead."""

    def __init__(self, option_strings, dest, advice: str, takes_value: bool, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs="?" if takes_value else 0, default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)
        self.advice = advice

    def __call__(self, parser, namespace, values, option_string=None):
        flag = self.option_strings[0]
        raise ConfigError(f"{flag} is a torchrun flag that resilient-run does not support: {self.advice}.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="resilient-run",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    t = p.add_argument_group("torchrun-compatible options")
    t.add_argument("--nnodes", default=None, help="N or MIN:MAX nodes (elastic between MIN and MAX). Default 1:1.")
    t.add_argument("--nproc-per-node", "--nproc_per_node", dest="nproc_per_node", default="1",
                   help="workers per node: an integer, or 'cpu' (one per core). Default 1.")
    t.add_argument("--rdzv-endpoint", "--rdzv_endpoint", dest="rdzv_endpoint", default=None,
                   help="comma-separated etcd endpoints host:port (failover in order).")
    t.add_argument("--rdzv-id", "--rdzv_id", dest="rdzv_id", default=None,
                   help="job id shared by every node of the job (default 'default', or random with --standalone).")
    t.add_argument("--rdzv-backend", "--rdzv_backend", dest="rdzv_backend", default=None,
                   help="c10d, etcd or etcd-v2, accepted for torchrun compatibility: resilient always uses its "
                        "own etcd v3 rendezvous at --rdzv-endpoint. Others (static...) are refused.")
    t.add_argument("--rdzv-conf", "--rdzv_conf", dest="rdzv_conf", default="",
                   help="key=value,... : join_timeout and last_call_timeout (seconds) are read, others are "
                        "ignored with a warning.")
    t.add_argument("--standalone", action="store_true",
                   help="single-node job with an embedded etcd started and stopped by this launcher "
                        "(not with --rdzv-endpoint).")
    t.add_argument("--max-restarts", "--max_restarts", dest="max_restarts", type=int, default=3,
                   help="job-wide restart budget (within --restart-window) before the job fails. Default 3.")
    t.add_argument("--monitor-interval", "--monitor_interval", dest="monitor_interval", type=_seconds,
                   default=None,
                   help="seconds between checks of the workers (exit, hang), > 0 and <= --lease-ttl/3. "
                        "Default min(0.1, lease_ttl/3).")
    t.add_argument("--node-rank", "--node_rank", dest="node_rank", type=int, default=None,
                   help="ignored with a warning: node order is decided by the rendezvous.")
    t.add_argument("--master-addr", "--master_addr", dest="master_addr", default=None,
                   help="ignored with a warning: the rendezvous picks the store host.")
    t.add_argument("--master-port", "--master_port", dest="master_port", type=int, default=None,
                   help="ignored with a warning: the rendezvous picks the store port.")
    t.add_argument("--local-addr", "--local_addr", dest="local_addr", default=None,
                   help="address peers use to reach this node (default 127.0.0.1 for single-host jobs, "
                        "else this host's name).")
    t.add_argument("--log-dir", "--log_dir", dest="log_dir", default=None,
                   help="directory for per-rank stdout/stderr and error files.")
    t.add_argument("-r", "--redirects", dest="redirects", type=_bool_or_int, default=0,
                   help="redirect worker std streams into --log-dir files: 0 none, 1 stdout, 2 stderr, 3 both.")
    t.add_argument("-t", "--tee", dest="tee", type=_bool_or_int, default=0,
                   help="like --redirects and also copy to the console, prefixed by the rank.")
    t.add_argument("--role", default="default", help="the workers' role, handed to them as ROLE_NAME. Default "
                                                      "'default'.")
    t.add_argument("--start-method", "--start_method", dest="start_method", default=None,
                   choices=("spawn", "fork", "forkserver"),
                   help="ignored with a warning: resilient forks from a warm zygote when safe, else spawns.")
    t.add_argument("-m", "--module", dest="module", action="store_true",
                   help="run the script as a module (python -m).")
    t.add_argument("--no-python", "--no_python", dest="no_python", action="store_true",
                   help="the script is an executable, not a Python file.")

    r = p.add_argument_group("resilient options")
    r.add_argument("--lease-ttl", type=int, default=5,
                   help="etcd lease TTL in whole seconds (>= 2): a lost host is noticed within it. Default 5.")
    r.add_argument("--hang-timeout", type=_seconds, default=None,
                   help="seconds without a progress beat (after the first) before a worker is declared hung, "
                        "its stacks dumped and it is killed. Default: off.")
    r.add_argument("--leave-timeout", type=_seconds, default=60.0,
                   help="seconds a worker has to leave its generation once the next one is announced (its "
                        "collective fails or its step ends); one still in it then is stuck (a CUDA sync on a "
                        "NCCL collective whose peer is gone): its stacks are dumped, it is killed and replaced. "
                        "0: off. Default 60.")
    r.add_argument("--join-timeout", type=_seconds, default=None,
                   help="seconds to wait for MIN nodes to join (longer than --last-call). Default 600.")
    r.add_argument("--last-call", type=_seconds, default=None,
                   help="seconds a rendezvous stays open for more nodes once MIN have joined. Default 1.")
    r.add_argument("--term-grace", type=_seconds, default=None,
                   help="seconds between SIGTERM and SIGKILL when stopping a worker. Default 5.")
    r.add_argument("--preempt-grace", type=_seconds, default=60.0,
                   help="on SIGTERM to the launcher: seconds the workers get to finish the step and "
                        "snapshot before they are stopped. Default 60.")
    r.add_argument("--restart-window", type=_seconds, default=3600.0,
                   help="seconds over which --max-restarts is counted (> 0). Default 3600.")
    r.add_argument("--replicas", type=int, default=2,
                   help="copies of each snapshot shard on distinct hosts (capped at the node count). Default 2.")
    r.add_argument("--snapshot-every", type=int, default=1,
                   help="default snapshot interval in steps for @resilient.elastic (0: off). Default 1.")
    r.add_argument("--persist-dir", default=None,
                   help="durable checkpoint directory or URL (safetensors + manifest). Default: none.")
    r.add_argument("--persist-every", type=int, default=0,
                   help="persist the committed snapshot every N steps (0: only on SIGTERM and at job end).")
    r.add_argument("--keep", type=int, default=2, help="durable checkpoints kept in --persist-dir. Default 2.")
    r.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on this port (0: any free port). Default: off.")
    r.add_argument("--event-log", default=None,
                   help="append JSON-lines events (starts, exits, rounds, commits, faults) to this file.")
    r.add_argument("--node-id", default=None, help="this node's id in the job. Default <hostname>-<pid>.")
    r.add_argument("--no-zygote", dest="zygote", action="store_false",
                   help="always start workers with a plain spawn instead of forking a warm zygote.")
    r.add_argument("--no-standby", dest="standby", action="store_false",
                   help="do not keep a standby worker (forked ahead of need, its heap faulted in to a worker's "
                        "size) to replace the next failed worker; replacements are then forked when needed.")
    r.add_argument("--etcd-ca", default=None, help="CA certificate for etcd TLS.")
    r.add_argument("--etcd-cert", default=None, help="client certificate for etcd mTLS.")
    r.add_argument("--etcd-key", default=None, help="client key for etcd mTLS.")
    r.add_argument("--etcd-user", default=None, help="etcd user (password from $RESILIENT_ETCD_PASSWORD).")

    for flags, (takes_value, advice) in UNSUPPORTED_TORCHRUN_FLAGS.items():
        p.add_argument(*flags, dest=f"unsupported_{flags[0][2:].replace('-', '_')}", action=_Unsupported,
                       advice=advice, takes_value=takes_value)

    p.add_argument("script", help="training script (or module with -m, executable with --no-python).")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments passed to the script.")
    return p


def _parse_rdzv_conf(spec: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for term in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = term.partition("=")
        if not sep:
            raise ConfigError(f"--rdzv-conf term {term!r} is not key=value.")
        out[key.strip()] = value.strip()
    return out


def _nproc(value: str) -> int:
    if value == "cpu":
        return os.cpu_count() or 1
    if value in ("gpu", "auto"):
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else (os.cpu_count() or 1)
    try:
        return int(value)
    except ValueError as exc:
        raise ConfigError(f"--nproc-per-node {value!r} must be an integer, 'cpu', 'gpu' or 'auto'.") from exc


def _flag_problems(ns: argparse.Namespace, conf: dict[str, str], join_timeout: float | None,
                   last_call: float | None) -> list[str]:
    """What is wrong with the command line before the settings objects are built, each naming its flag (the
    ``Timeouts`` and ``RendezvousSettings`` messages name their fields, which resilient-run users never see)."""
    problems = []
    if ns.rdzv_backend is not None and ns.rdzv_backend not in ACCEPTED_RDZV_BACKENDS:
        why = ("static rendezvous (fixed --node-rank and --master-addr) is not supported: resilient coordinates "
               "its nodes through etcd" if ns.rdzv_backend == "static" else "it is not a rendezvous backend "
               "resilient-run knows")
        problems.append(
            f"--rdzv-backend {ns.rdzv_backend!r}: {why}; drop --rdzv-backend (or pass one of "
            f"{', '.join(ACCEPTED_RDZV_BACKENDS)}), and give an etcd with --rdzv-endpoint HOST:PORT or use "
            "--standalone on a single node"
        )
    if ns.standalone and ns.rdzv_endpoint:
        problems.append(
            f"--standalone starts its own etcd; drop --rdzv-endpoint, or drop --standalone to use the etcd at "
            f"{ns.rdzv_endpoint}"
        )
    ttl = ns.lease_ttl
    if ttl < 2:
        problems.append(f"--lease-ttl {ttl} must be a whole number of seconds >= 2 (etcd's minimum lease TTL)")
    if ns.monitor_interval is not None and ttl >= 2 and not 0 < ns.monitor_interval <= ttl / 3:
        problems.append(
            f"--monitor-interval {ns.monitor_interval:g} must be > 0 and <= --lease-ttl/3 ({ttl / 3:.4g} s with "
            f"--lease-ttl {ttl}); lower it, or raise --lease-ttl"
        )
    join_name = "--join-timeout"
    if ns.join_timeout is None and "join_timeout" in conf:
        join_name = "--rdzv-conf join_timeout"
    last_name = "--last-call"
    if ns.last_call is None:
        last_name = next((f"--rdzv-conf {k}" for k in ("last_call_timeout", "last_call") if k in conf), last_name)
    join = join_timeout if join_timeout is not None else Timeouts.join_timeout
    last = last_call if last_call is not None else Timeouts.last_call
    join_given, last_given = _given(join_name, join), _given(last_name, last)
    if last < 0:
        problems.append(f"{last_given} must be >= 0")
        if join <= 0:
            problems.append(f"{join_given} must be > 0")
    elif last >= join:
        problems.append(
            f"{last_given} must be shorter than {join_given}, or a round can time out while it still waits for "
            f"latecomers; raise {join_name} or lower {last_name}"
        )
    if ns.term_grace is not None and ns.term_grace <= 0:
        problems.append(f"--term-grace {ns.term_grace:g} s must be > 0")
    return problems


def _given(name: str, seconds: float) -> str:
    """How the user wrote a duration: ``--join-timeout 5 s`` or ``--rdzv-conf join_timeout=5``."""
    return f"{name}={seconds:g}" if name.startswith("--rdzv-conf") else f"{name} {seconds:g} s"


def ignored_flags(ns: argparse.Namespace, conf: dict[str, str]) -> list[str]:
    """torchrun flags given on this command line that resilient-run accepts but does not use, each with why.

    ``conf`` is ``ns.rdzv_conf`` as ``_parse_rdzv_conf`` parsed it.
    """
    notes = []
    static = [f"{flag} {value}" for flag, value in (("--node-rank", ns.node_rank), ("--master-addr", ns.master_addr),
                                                    ("--master-port", ns.master_port)) if value is not None]
    if static:
        notes.append(
            f"{', '.join(static)} (torchrun uses {'it' if len(static) == 1 else 'them'} only for static rendezvous; "
            "resilient's etcd rendezvous orders the nodes, and the agent of group rank 0 hosts the store on a port "
            "it picks)"
        )
    if ns.start_method is not None:
        notes.append(
            f"--start-method {ns.start_method} (workers are forked from a warm zygote when safe, else spawned; "
            "--no-zygote always spawns)"
        )
    unknown = [k for k in conf if k not in RDZV_CONF_KEYS]
    if unknown:
        notes.append(
            f"--rdzv-conf {', '.join(unknown)} (only {', '.join(RDZV_CONF_TORCHRUN_KEYS)} are read; "
            "see --join-timeout and --last-call)"
        )
    return notes


def settings_from_args(ns: argparse.Namespace, conf: dict[str, str]) -> AgentSettings:
    """``AgentSettings`` from parsed flags; ``conf`` is ``ns.rdzv_conf`` as ``_parse_rdzv_conf`` parsed it."""
    join_timeout = ns.join_timeout if ns.join_timeout is not None else _float_conf(conf, "join_timeout")
    last_call = ns.last_call if ns.last_call is not None else _float_conf(conf, "last_call_timeout", "last_call")
    problems = _flag_problems(ns, conf, join_timeout, last_call)
    if problems:
        raise ConfigError("Invalid resilient-run options: " + "; ".join(problems) + ".")
    timeouts = Timeouts.from_lease_ttl(
        ns.lease_ttl,
        monitor_interval=ns.monitor_interval,
        join_timeout=join_timeout,
        last_call=last_call,
        term_grace=ns.term_grace,
    )
    if ns.standalone:
        nodes = NodeRange.parse(ns.nnodes) if ns.nnodes else NodeRange(1, 1)
        etcd = None
    else:
        nodes = NodeRange.parse(ns.nnodes or "1")
        endpoint = ns.rdzv_endpoint or env.get(env.ETCD_ENDPOINTS)
        etcd = (
            EtcdSettings.parse(
                endpoint,
                ca_cert=ns.etcd_ca,
                cert_cert=ns.etcd_cert,
                cert_key=ns.etcd_key,
                user=ns.etcd_user,
                password=os.environ.get(env.ETCD_PASSWORD) if ns.etcd_user else None,
                connect_timeout=timeouts.connect_timeout,
                request_deadline=timeouts.request_deadline,
            )
            if endpoint
            else None
        )
    job_id = ns.rdzv_id or (f"standalone-{os.getpid()}" if ns.standalone else "default")
    node_id = ns.node_id or f"{socket.gethostname()}-{os.getpid()}"
    advertise = ns.local_addr or ("127.0.0.1" if ns.standalone or _all_loopback(etcd) else socket.gethostname())
    script_args = tuple(ns.script_args)
    if script_args and script_args[0] == "--":
        script_args = script_args[1:]
    return AgentSettings(
        script=ns.script,
        script_args=script_args,
        nodes=nodes,
        nproc_per_node=_nproc(ns.nproc_per_node),
        job_id=job_id,
        node_id=node_id,
        etcd=etcd,
        timeouts=timeouts,
        standalone=ns.standalone,
        max_restarts=ns.max_restarts,
        restart_window=ns.restart_window,
        hang_timeout=ns.hang_timeout,
        leave_timeout=ns.leave_timeout or None,
        replicas=ns.replicas,
        snapshot_every=ns.snapshot_every,
        persist_dir=ns.persist_dir,
        persist_every=ns.persist_every,
        keep=ns.keep,
        metrics_port=ns.metrics_port,
        event_log=ns.event_log,
        log_dir=ns.log_dir,
        redirects=ns.redirects,
        tee=ns.tee,
        preempt_grace=ns.preempt_grace,
        run_module=ns.module,
        no_python=ns.no_python,
        zygote=ns.zygote,
        standby=ns.standby,
        advertise_addr=advertise,
        role=ns.role,
    )


def _float_conf(conf: dict[str, str], *names: str) -> float | None:
    for name in names:
        if name in conf:
            try:
                return float(conf[name])
            except ValueError as exc:
                raise ConfigError(f"--rdzv-conf {name}={conf[name]!r} must be a number of seconds.") from exc
    return None


def _all_loopback(etcd: EtcdSettings | None) -> bool:
    if etcd is None:
        return True
    return all(ep.rpartition(":")[0] in ("127.0.0.1", "localhost", "::1", "[::1]") for ep in etcd.endpoints)


def parse(argv: Sequence[str] | None = None) -> AgentSettings:
    """Parse and validate; ``SystemExit(2)`` for usage errors, ``ConfigError`` for inconsistent values."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    conf = _parse_rdzv_conf(ns.rdzv_conf)
    settings = settings_from_args(ns, conf)
    if ns.rdzv_backend is not None:
        log.info("--rdzv-backend %s: resilient-run always uses its own etcd v3 rendezvous (%s)", ns.rdzv_backend,
                 "the embedded etcd of --standalone" if settings.standalone else "the etcd at --rdzv-endpoint")
    notes = ignored_flags(ns, conf)
    if notes:
        log.warning("resilient-run ignores these torchrun flags: %s.", "; ".join(notes))
    return settings

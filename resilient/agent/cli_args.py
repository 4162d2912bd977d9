"""The ``resilient-run`` command line: torchrun's core flags (same names and meaning) plus resilient's own.

``parse(argv)`` returns a validated ``AgentSettings`` or raises ``ConfigError``/``SystemExit`` (argparse's
usage errors) before anything is started.
"""

from __future__ import annotations

import argparse
import os
import socket
from typing import Sequence

from resilient import env
from resilient.agent.settings import AgentSettings
from resilient.config import EtcdSettings, NodeRange, Timeouts
from resilient.errors import ConfigError

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


def _nonneg_float(value: str) -> float:
    try:
        f = float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from exc
    if f < 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be >= 0")
    return f


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
    t.add_argument("--rdzv-backend", "--rdzv_backend", dest="rdzv_backend", default="etcd",
                   help="accepted for torchrun compatibility; resilient always uses etcd v3.")
    t.add_argument("--rdzv-conf", "--rdzv_conf", dest="rdzv_conf", default="",
                   help="key=value,... : join_timeout and last_call (seconds) are read, others ignored.")
    t.add_argument("--standalone", action="store_true",
                   help="single-node job with an embedded etcd started and stopped by this launcher.")
    t.add_argument("--max-restarts", "--max_restarts", dest="max_restarts", type=int, default=3,
                   help="job-wide restart budget (within --restart-window) before the job fails. Default 3.")
    t.add_argument("--monitor-interval", "--monitor_interval", dest="monitor_interval", type=float, default=None,
                   help="seconds between checks of the workers (exit, hang). Default min(0.1, lease_ttl/3).")
    t.add_argument("--node-rank", "--node_rank", dest="node_rank", type=int, default=None,
                   help="accepted for compatibility; node order is decided by the rendezvous.")
    t.add_argument("--master-addr", "--master_addr", dest="master_addr", default=None,
                   help="accepted for compatibility; the rendezvous picks the store host.")
    t.add_argument("--master-port", "--master_port", dest="master_port", type=int, default=None,
                   help="accepted for compatibility; the rendezvous picks the store port.")
    t.add_argument("--local-addr", "--local_addr", dest="local_addr", default=None,
                   help="address peers use to reach this node (default 127.0.0.1 for single-host jobs, "
                        "else this host's name).")
    t.add_argument("--log-dir", "--log_dir", dest="log_dir", default=None,
                   help="directory for per-rank stdout/stderr and error files.")
    t.add_argument("-r", "--redirects", dest="redirects", type=_bool_or_int, default=0,
                   help="redirect worker std streams into --log-dir files: 0 none, 1 stdout, 2 stderr, 3 both.")
    t.add_argument("-t", "--tee", dest="tee", type=_bool_or_int, default=0,
                   help="like --redirects and also copy to the console, prefixed by the rank.")
    t.add_argument("--role", default="default", help="accepted for compatibility.")
    t.add_argument("--start-method", "--start_method", dest="start_method", default="spawn",
                   choices=("spawn", "fork", "forkserver"),
                   help="accepted for compatibility; resilient forks from a warm zygote when safe.")
    t.add_argument("-m", "--module", dest="module", action="store_true",
                   help="run the script as a module (python -m).")
    t.add_argument("--no-python", "--no_python", dest="no_python", action="store_true",
                   help="the script is an executable, not a Python file.")

    r = p.add_argument_group("resilient options")
    r.add_argument("--lease-ttl", type=int, default=5,
                   help="etcd lease TTL in whole seconds (>= 2): a lost host is noticed within it. Default 5.")
    r.add_argument("--hang-timeout", type=float, default=None,
                   help="seconds without a progress beat (after the first) before a worker is declared hung, "
                        "its stacks dumped and it is killed. Default: off.")
    r.add_argument("--leave-timeout", type=float, default=60.0,
                   help="seconds a worker has to leave its generation once the next one is announced (its "
                        "collective fails or its step ends); one still in it then is stuck (a CUDA sync on a "
                        "NCCL collective whose peer is gone): its stacks are dumped, it is killed and replaced. "
                        "0: off. Default 60.")
    r.add_argument("--join-timeout", type=float, default=None,
                   help="seconds to wait for MIN nodes to join. Default 600.")
    r.add_argument("--last-call", type=float, default=None,
                   help="seconds a rendezvous stays open for more nodes once MIN have joined. Default 1.")
    r.add_argument("--term-grace", type=float, default=None,
                   help="seconds between SIGTERM and SIGKILL when stopping a worker. Default 5.")
    r.add_argument("--preempt-grace", type=float, default=60.0,
                   help="on SIGTERM to the launcher: seconds the workers get to finish the step and "
                        "snapshot before they are stopped. Default 60.")
    r.add_argument("--restart-window", type=float, default=3600.0,
                   help="seconds over which --max-restarts is counted. Default 3600.")
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


def settings_from_args(ns: argparse.Namespace) -> AgentSettings:
    conf = _parse_rdzv_conf(ns.rdzv_conf)
    join_timeout = ns.join_timeout if ns.join_timeout is not None else _float_conf(conf, "join_timeout")
    last_call = ns.last_call if ns.last_call is not None else _float_conf(conf, "last_call_timeout", "last_call")
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
    return settings_from_args(ns)

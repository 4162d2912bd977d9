"""``resilient status --rdzv-endpoint HOST:PORT[,...] --rdzv-id JOB [--json]``: what etcd says about a job.

etcd TLS and auth take resilient-run's flags (``--etcd-ca``, ``--etcd-cert``/``--etcd-key``,
``--etcd-user`` with the password in ``$RESILIENT_ETCD_PASSWORD``). Exit status: 0 after printing; 2 for
bad options, or when etcd cannot be reached or read (the message names the endpoints).

Prints the current generation (world size, when it formed), each member with its group rank, ranks,
agent address, last step seen (``progress/<node>``) and how old that report is, how long its lease has
left (a live agent keeps it near the TTL; a low value means missed keep-alives), nodes waiting to join,
the committed checkpoint step, the restart count and whether the job is closed. ``read_status`` gathers
it as a dict (also what ``--json`` prints; ``exists`` is false when etcd holds no key of the job at all,
usually a mistyped ``--rdzv-id``); ``format_status`` renders the table. ``closed_text``,
``missing_job_hint``, ``ago`` and ``fmt`` are shared with ``resilient top``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Sequence

from resilient import env
from resilient.config import EtcdSettings
from resilient.errors import EtcdError, ResilientError
from resilient.etcd.api import Get, KVStore
from resilient.keys import JobKeys
from resilient.rendezvous.budget import BudgetRecord
from resilient.rendezvous.model import Assignment, NodeInfo


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


def read_status(kv: KVStore, job: str, now: float | None = None) -> dict[str, Any]:
    """Everything ``status`` shows, read at one etcd revision (plus one lease query per node)."""
    keys = JobKeys(job)
    now = time.time() if now is None else now
    r = kv.txn(
        [],
        [
            Get(keys.rdzv),
            Get(keys.nodes_prefix, prefix=True),
            Get(keys.progress_prefix, prefix=True),
            Get(keys.waiting_prefix, prefix=True),
            Get(keys.committed),
            Get(keys.restarts),
            Get(keys.closed),
            Get(keys.closer),
        ],
    )
    rdzv, nodes, progress, waiting, committed, restarts, closed, closer = r.responses
    # a job that ran leaves rdzv, gen/... behind; only when none of the keys read is there, ask whether any
    # key of the job exists (the whole prefix: small then, by construction)
    exists = any(r.responses) or bool(kv.get_prefix(keys.prefix)[0])
    generation = int(_json(rdzv[0].value)["g"]) if rdzv else 0
    formed_rev = rdzv[0].mod_revision if rdzv else 0
    assignment = None
    if generation:
        got = kv.get(keys.gen(generation))
        assignment = Assignment.from_json(got.value) if got is not None else None
    alive = {kv_.key[len(keys.nodes_prefix):]: kv_ for kv_ in nodes}
    steps = {kv_.key[len(keys.progress_prefix):]: _json(kv_.value) for kv_ in progress}

    def node_row(node_id: str) -> dict[str, Any]:
        row: dict[str, Any] = {"node": node_id, "alive": node_id in alive}
        if node_id in alive:
            try:
                row["addr"] = NodeInfo.from_json(alive[node_id].value).addr
            except ResilientError:
                row["addr"] = None
            row["lease_left_s"] = kv.lease_ttl(alive[node_id].lease) if alive[node_id].lease else None
        p = steps.get(node_id)
        if isinstance(p, dict):
            row["step"] = p.get("step")
            row["progress_age_s"] = round(now - float(p.get("t", now)), 3)
        return row

    members = []
    if assignment is not None:
        for e in assignment.nodes:
            row = node_row(e.node_id)
            row.update(group_rank=e.group_rank, ranks=list(e.ranks))
            members.append(row)
    placed = set(assignment.node_ids) if assignment else set()
    others = sorted(n for n in alive if n not in placed)
    asking = sorted(kv_.key[len(keys.waiting_prefix):] for kv_ in waiting if kv_.mod_revision > formed_rev)
    budget = BudgetRecord.from_json(restarts[0].value) if restarts else BudgetRecord()
    return {
        "job": job,
        "exists": exists,
        "generation": generation,
        "world_size": assignment.world_size if assignment else 0,
        "formed_at": assignment.created_at if assignment else None,
        "master": f"{assignment.master_addr}:{assignment.master_port}" if assignment else None,
        "members": members,
        "other_nodes": [node_row(n) for n in others],
        "waiting": asking,
        "closer": closer[0].value.decode() if closer else None,
        "committed": _json(committed[0].value) if committed else None,
        "restarts": budget.total,
        "closed": _json(closed[0].value) if closed else None,
    }


def fmt(v: Any, unit: str = "") -> str:
    """``v`` with ``unit`` appended, ``-`` for None."""
    return "-" if v is None else f"{v}{unit}"


def ago(t: Any, now: float) -> str:
    """How long ago wall time ``t`` was, as ``3.0s ago`` (``?`` when it is not a number)."""
    if not isinstance(t, (int, float)):
        return "?"
    return f"{max(0.0, now - t):.1f}s ago"


def missing_job_hint(s: dict[str, Any]) -> str | None:
    """A sentence for a job etcd holds no key of (``read_status``'s ``exists`` is false), else None."""
    if s.get("exists", True):
        return None
    return (f"no key of job {s['job']!r} in etcd (nothing under {JobKeys(s['job']).prefix}): check --rdzv-id "
            "(the id resilient-run was given) and --rdzv-endpoint (the etcd it used)")


def closed_text(closed: Any, now: float) -> str:
    """The ``closed`` record as ``succeeded (reason) by node, 3.0s ago`` (a record of another shape as is)."""
    if not isinstance(closed, dict):
        return str(closed)
    return f"{closed.get('status')} ({closed.get('reason')}) by {closed.get('by')}, {ago(closed.get('t'), now)}"


def committed_text(s: dict[str, Any]) -> str:
    """The step of etcd's ``committed`` record; without one ``-``, and why when the job has a single node."""
    committed = s["committed"]
    if isinstance(committed, dict):
        return fmt(committed.get("step"))
    if committed is not None:
        return str(committed)
    if s["generation"] and len(s["members"]) == 1:
        return "- (none in etcd yet; a job of --nnodes 1 or --standalone keeps its commits in its agent)"
    return "-"


def format_status(s: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [f"job {s['job']}"]
    hint = missing_job_hint(s)
    if hint is not None:
        lines.append(f"  {hint}")
        return "\n".join(lines)
    if s["closed"] is not None:
        lines.append(f"  CLOSED: {closed_text(s['closed'], now)}")
    if not s["generation"]:
        lines.append("  no generation has formed yet")
    else:
        age = now - s["formed_at"]
        lines.append(
            f"  generation {s['generation']}: world size {s['world_size']}, {len(s['members'])} nodes, "
            f"formed {age:.1f}s ago, process-group store {s['master']}"
        )
    lines.append(f"  committed step: {committed_text(s)}    restarts: {s['restarts']}    "
                 f"closer: {fmt(s['closer'])}")
    header = f"  {'node':<16} {'grp':>3} {'ranks':<16} {'alive':<5} {'lease left':>10} {'step':>8} {'reported':>9}  addr"
    rows = s["members"] + s["other_nodes"]
    if rows:
        lines.append(header)
    for row in rows:
        ranks = row.get("ranks")
        rtxt = "-" if ranks is None else (f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else str(ranks[0]))
        lines.append(
            f"  {row['node']:<16} {fmt(row.get('group_rank')):>3} {rtxt:<16} {'yes' if row['alive'] else 'NO':<5} "
            f"{fmt(row.get('lease_left_s'), 's'):>10} {fmt(row.get('step')):>8} "
            f"{fmt(row.get('progress_age_s'), 's'):>9}  {fmt(row.get('addr'))}"
        )
    if s["waiting"]:
        lines.append(f"  waiting to join: {', '.join(s['waiting'])}")
    return "\n".join(lines)


EXIT_OK = 0
EXIT_UNREADABLE = 2  # bad options, or etcd could not be read (as resilient-run and resilient top)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resilient status", description=__doc__.splitlines()[0])
    add_job_etcd_args(p)
    p.add_argument("--json", action="store_true", help="print the status as one JSON object")
    return p


def add_job_etcd_args(p: argparse.ArgumentParser) -> None:
    """The job and etcd flags shared by the read-only commands (``status``, ``top``): the same endpoint,
    TLS and auth flags as resilient-run (resilient/agent/cli_args.py)."""
    p.add_argument("--rdzv-endpoint", default=env.get(env.ETCD_ENDPOINTS),
                   help=f"etcd host:port[,host:port...] (default ${env.ETCD_ENDPOINTS})")
    p.add_argument("--rdzv-id", required=True, help="the job id (resilient-run's --rdzv-id)")
    p.add_argument("--connect-timeout", type=float, default=5.0,
                   help="seconds to wait for etcd to answer. Default 5.")
    p.add_argument("--etcd-ca", default=None, help="CA certificate for etcd TLS.")
    p.add_argument("--etcd-cert", default=None, help="client certificate for etcd mTLS.")
    p.add_argument("--etcd-key", default=None, help="client key for etcd mTLS.")
    p.add_argument("--etcd-user", default=None, help=f"etcd user (password from ${env.ETCD_PASSWORD}).")


def etcd_settings(args: argparse.Namespace, request_deadline: float = 2.0) -> EtcdSettings:
    """EtcdSettings from the flags of ``add_job_etcd_args``."""
    return EtcdSettings.parse(
        args.rdzv_endpoint,
        ca_cert=args.etcd_ca,
        cert_cert=args.etcd_cert,
        cert_key=args.etcd_key,
        user=args.etcd_user,
        password=env.get(env.ETCD_PASSWORD) if args.etcd_user else None,
        connect_timeout=args.connect_timeout,
        request_deadline=max(args.connect_timeout, request_deadline),
    )


def _settings(args: argparse.Namespace) -> EtcdSettings:
    return etcd_settings(args)


def status_main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 after printing the status; 2 for bad options or when etcd cannot be read."""
    parser = _parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if not args.rdzv_endpoint:
        parser.error(f"--rdzv-endpoint is required (or set {env.ETCD_ENDPOINTS})")
    if args.connect_timeout <= 0:
        parser.error(f"--connect-timeout {args.connect_timeout:g} must be > 0")
    if args.etcd_user and not env.get(env.ETCD_PASSWORD):
        parser.error(f"--etcd-user needs the password in ${env.ETCD_PASSWORD}")
    from resilient.etcd.client import EtcdKV

    try:
        settings = _settings(args)
    except ResilientError as exc:
        print(f"resilient status: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    try:
        with EtcdKV.connect(settings) as kv:
            s = read_status(kv, args.rdzv_id)
    except EtcdError as exc:
        print(
            f"resilient status: cannot read job {args.rdzv_id!r} from etcd at {', '.join(settings.endpoints)}: "
            f"{exc}",
            file=sys.stderr,
        )
        return EXIT_UNREADABLE
    except ResilientError as exc:
        print(f"resilient status: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    print(json.dumps(s) if args.json else format_status(s))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(status_main())
